"""kernels.refactorize / lowrank_svd / refactorize_pairs against dense float64 numpy SVDs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import lowrank_svd, refactorize, refactorize_householder, refactorize_pairs
from kernels.gram import refactorize_gram

TOL = 1e-5


def conditioned(rng, rows, cols, cond=1.0):
    """A random rows × cols matrix with singular values geomspace(1, 1/cond)."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, min(rows, cols))))
    v, _ = np.linalg.qr(rng.normal(size=(cols, min(rows, cols))))
    return (u * np.geomspace(1.0, 1.0 / cond, min(rows, cols))) @ v.T


def factors(rng, L, m, r, n, cond=1.0, dtype=torch.float32):
    """Stacks B (L, m, r), A (L, r, n) whose factors have condition number ``cond``."""
    B = np.stack([conditioned(rng, m, r, cond) for _ in range(L)])
    A = np.stack([conditioned(rng, r, n, cond) for _ in range(L)])
    return torch.tensor(B, dtype=dtype), torch.tensor(A, dtype=dtype)


def dense(B, A):
    """M = B A formed explicitly in float64 numpy: the reference the kernels must match."""
    return B.double().numpy() @ A.double().numpy()


def rel_err(B_new, A_new, B, A) -> float:
    M = dense(B, A)
    return float(np.linalg.norm(dense(B_new, A_new) - M) / max(np.linalg.norm(M), 1e-300))


def orth_err(A_new, rows=None) -> float:
    """max |A' A'ᵀ − I| over the first ``rows`` rows of every layer."""
    A64 = A_new.double()[:, :rows]
    eye = torch.eye(A64.shape[1], dtype=torch.float64)
    return float((A64 @ A64.mT - eye).abs().max())


def reference_loop(B, A):
    """Per-matrix reference: dense float64 SVD of each formed M_l, B' = U_r Σ_r, A' = V_rᵀ."""
    out_B, out_A, out_S = [], [], []
    _, m, r = B.shape
    k = min(m, A.shape[2], r)  # components beyond k are zero (B') or absent (A')
    for B_l, A_l in zip(B, A, strict=True):
        u, s, vh = np.linalg.svd(dense(B_l, A_l))
        out_B.append(np.pad(u[:, :k] * s[:k], ((0, 0), (0, r - k))))
        out_A.append(vh[:k])
        out_S.append(np.pad(s[:k], (0, r - k)))
    return np.stack(out_B), np.stack(out_A), np.stack(out_S)


def assert_refactorized(B, A, B_new, A_new, tol=TOL):
    assert B_new.shape == B.shape and A_new.shape == A.shape
    assert B_new.dtype == B.dtype and A_new.dtype == A.dtype
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert rel_err(B_new, A_new, B, A) <= tol
    assert orth_err(A_new, rows=min(A.shape[1:])) <= tol


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 4), m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 8),
       log_cond=st.floats(0, 3), seed=st.integers(0, 2**16))
def test_refactorize_matches_per_matrix_dense_svd(L, m, n, r, log_cond, seed):
    B, A = factors(np.random.default_rng(seed), L, m, r, n, cond=10**log_cond)
    B_new, A_new = refactorize(B, A)
    assert_refactorized(B, A, B_new, A_new)
    _, _, S_ref = reference_loop(B, A)
    k = min(m, n, r)
    S = torch.linalg.vector_norm(B_new.double(), dim=1).numpy()  # σ_i = ‖column i of B'‖
    np.testing.assert_allclose(S[:, :k], S_ref[:, :k], rtol=1e-4,
                               atol=1e-6 * S_ref[:, :1].max())
    if k < r:  # no rank left: zero columns of B'
        assert torch.count_nonzero(B_new[:, :, k:]) == 0


def test_singular_vectors_match_the_loop_reference_when_the_spectrum_is_separated():
    rng = np.random.default_rng(0)
    L, m, r, n = 3, 30, 5, 20
    B = torch.tensor(np.stack([conditioned(rng, m, r, 1e2) for _ in range(L)]),
                     dtype=torch.float32)
    A = torch.tensor(np.stack([np.linalg.qr(rng.normal(size=(n, r)))[0].T for _ in range(L)]),
                     dtype=torch.float32)
    B_new, A_new = refactorize(B, A)
    B_ref, A_ref, S_ref = reference_loop(B, A)
    signs = np.sign(np.sum(A_new.double().numpy() * A_ref, axis=2, keepdims=True))
    # Wedin: a backward error ‖E‖ in M moves the i-th singular vector by about ‖E‖ / gap_i,
    # gap_i = distance from σ_i to its nearest other singular value. Float32 arithmetic gives
    # ‖E‖ of a few unit roundoffs u · σ_1 (measured: at most 4.2 u σ_1 / gap_i, on an AMD EPYC
    # and an Intel Xeon); allow 32, so the bound, not one CPU's rounding, decides.
    gaps = np.minimum(np.abs(np.diff(S_ref, axis=1, prepend=np.inf)),
                      np.abs(np.diff(S_ref, axis=1, append=-np.inf)))
    row_tol = 32 * 2.0**-24 * S_ref[:, :1] / gaps  # (L, r): the bound for each singular vector
    row_err = np.abs(A_new.double().numpy() - signs * A_ref).max(axis=2)
    assert (row_err <= row_tol).all(), (row_err, row_tol)
    np.testing.assert_allclose(B_new.double().numpy(), B_ref * np.swapaxes(signs, 1, 2),
                               atol=1e-5)


def test_zero_b_gives_exactly_zero_b_and_orthonormal_a():
    B, A = factors(np.random.default_rng(1), 3, 16, 4, 12)
    B_new, A_new = refactorize(torch.zeros_like(B), A)
    assert torch.count_nonzero(B_new) == 0
    assert torch.isfinite(A_new).all() and orth_err(A_new) <= TOL


@pytest.mark.parametrize("case", ["duplicated-columns", "two-identical-clients", "rank-1",
                                  "zero-a-row"])
def test_rank_deficient_inputs_stay_exact_and_orthonormal(case):
    rng = np.random.default_rng(2)
    B, A = factors(rng, 2, 20, 6, 15)
    if case == "duplicated-columns":
        B[:, :, 3:] = B[:, :, :3]
    elif case == "two-identical-clients":
        B = 0.5 * B + 0.5 * B.clone()
        B[:, :, 4:] = B[:, :, :2]
    elif case == "rank-1":
        B = B[:, :, :1] * torch.ones(1, 1, 6)
    else:
        A[:, 2] = 0.0
    B_new, A_new = refactorize(B, A)
    assert_refactorized(B, A, B_new, A_new)


def test_rank_equal_to_min_dimension_and_batch_of_one():
    for m, r, n in [(5, 5, 9), (9, 5, 5), (6, 6, 6)]:
        B, A = factors(np.random.default_rng(3), 1, m, r, n, cond=10.0)
        assert_refactorized(B, A, *refactorize(B, A))


def test_rank_above_m_still_gives_r_orthonormal_rows():
    B, A = factors(np.random.default_rng(4), 2, 3, 5, 7)
    B_new, A_new = refactorize(B, A)
    assert_refactorized(B, A, B_new, A_new)
    assert orth_err(A_new) <= TOL  # all 5 rows, although rank(BA) ≤ 3
    assert torch.count_nonzero(B_new[:, :, 3:]) == 0


def test_rank_above_n_pads_a_with_zero_rows():
    B, A = factors(np.random.default_rng(5), 2, 7, 5, 3)
    B_new, A_new = refactorize(B, A)
    assert_refactorized(B, A, B_new, A_new)
    assert torch.count_nonzero(A_new[:, 3:]) == 0 and torch.count_nonzero(B_new[:, :, 3:]) == 0


def test_a_refactorized_pair_is_a_fixed_point():
    B, A = factors(np.random.default_rng(6), 2, 12, 4, 10, cond=30.0)
    B1, A1 = refactorize(B, A)
    B2, A2 = refactorize(B1, A1)
    torch.testing.assert_close(B2, B1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A2, A1, atol=1e-5, rtol=1e-5)


def test_sqrt_split_preserves_product_with_orthogonal_rows():
    B, A = factors(np.random.default_rng(7), 2, 12, 4, 10, cond=10.0)
    B_new, A_new = refactorize(B, A, sigma="sqrt")
    assert rel_err(B_new, A_new, B, A) <= TOL
    gram = A_new.double() @ A_new.double().mT  # = Σ
    _, _, S_ref = reference_loop(B, A)
    np.testing.assert_allclose(torch.diagonal(gram, dim1=1, dim2=2).numpy(), S_ref, rtol=1e-4)
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert off_diagonal.abs().max() <= TOL * gram.abs().max()
    torch.testing.assert_close(torch.linalg.vector_norm(B_new.double(), dim=1),
                               torch.linalg.vector_norm(A_new.double(), dim=2), rtol=1e-4,
                               atol=1e-7)


def test_sqrt_split_of_zero_b_is_zero():
    B, A = factors(np.random.default_rng(8), 1, 6, 3, 5)
    B_new, A_new = refactorize(torch.zeros_like(B), A, sigma="sqrt")
    assert torch.count_nonzero(B_new) == 0 and torch.count_nonzero(A_new) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_are_preserved(dtype):
    B, A = factors(np.random.default_rng(9), 2, 16, 4, 8, cond=3.0, dtype=dtype)
    B_new, A_new = refactorize(B, A)
    assert B_new.dtype == dtype and A_new.dtype == dtype
    tol = {torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(B_new, A_new, B, A) <= tol
    assert orth_err(A_new) <= tol


def test_float64_is_exact_to_float64_precision():
    B, A = factors(np.random.default_rng(10), 2, 30, 6, 20, cond=1e6, dtype=torch.float64)
    B_new, A_new = refactorize(B, A)
    assert rel_err(B_new, A_new, B, A) <= 1e-12 and orth_err(A_new) <= 1e-12


def test_lowrank_svd_truncates_like_numpy():
    B, A = factors(np.random.default_rng(11), 2, 30, 6, 25, cond=100.0)
    U, S, Vh = lowrank_svd(B, A, k=3)
    assert U.shape == (2, 30, 3) and S.shape == (2, 3) and Vh.shape == (2, 3, 25)
    for i in range(2):
        M = dense(B[i], A[i])
        u, s, vh = np.linalg.svd(M)
        np.testing.assert_allclose(S[i].double().numpy(), s[:3], rtol=1e-5)
        assert (np.diff(S[i].double().numpy()) <= 0).all()
        approx = (U[i].double() * S[i].double()) @ Vh[i].double()
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert np.linalg.norm(approx.numpy() - best) <= 1e-5 * np.linalg.norm(M)
    assert orth_err(U.mT) <= TOL and orth_err(Vh) <= TOL


def test_lowrank_svd_rejects_k_out_of_range():
    B, A = factors(np.random.default_rng(12), 1, 6, 3, 5)
    for k in (0, 4):
        with pytest.raises(ValueError, match=f"k={k}"):
            lowrank_svd(B, A, k=k)


def test_refactorize_pairs_groups_mixed_shapes_and_keeps_order():
    rng = np.random.default_rng(13)
    shapes = {"l0.q": (8, 4, 6), "l0.up": (12, 4, 6), "l0.v": (8, 4, 6), "l0.down": (6, 4, 12),
              "l1.q": (8, 4, 6), "l1.v64": (8, 4, 6)}
    pairs = {}
    for name, (m, r, n) in shapes.items():
        B, A = factors(rng, 1, m, r, n, cond=5.0,
                       dtype=torch.float64 if name.endswith("64") else torch.float32)
        pairs[name] = (B[0], A[0])
    out = refactorize_pairs(pairs)
    assert list(out) == list(pairs)
    for name, (B_new, A_new) in out.items():
        B, A = pairs[name]
        assert_refactorized(B[None], A[None], B_new[None], A_new[None])
        # one batched call per group gives the same as one call per layer
        B_one, A_one = refactorize(B[None], A[None])
        torch.testing.assert_close(B_new, B_one[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(A_new, A_one[0], atol=1e-5, rtol=1e-4)
    assert refactorize_pairs({}) == {}


def test_householder_path_is_the_same_contract():
    B, A = factors(np.random.default_rng(14), 3, 20, 4, 16, cond=1e3)
    assert_refactorized(B, A, *refactorize_householder(B, A))


def test_shape_and_type_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"B \(2, 5, 3\) and A \(2, 4, 6\)"):
        refactorize(torch.zeros(2, 5, 3), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match=r"B \(2, 5, 3\) and A \(3, 3, 6\)"):
        refactorize(torch.zeros(2, 5, 3), torch.zeros(3, 3, 6))
    with pytest.raises(ValueError, match=r"expected stacks.*\(5, 3\).*\(3, 6\)"):
        refactorize(torch.zeros(5, 3), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="sigma='U'"):
        refactorize(torch.zeros(1, 5, 3), torch.zeros(1, 3, 6), sigma="U")
    with pytest.raises(TypeError, match="floating"):
        refactorize(torch.zeros(1, 5, 3, dtype=torch.int64), torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match=r"pairs\['q'\].*\(5, 3\).*\(4, 6\)"):
        refactorize_pairs({"q": (torch.zeros(5, 3), torch.zeros(4, 6))})


def test_non_finite_inputs_raise_instead_of_returning_nan():
    B, A = factors(np.random.default_rng(15), 1, 6, 3, 5)
    B[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        refactorize(B, A)


# --- the Gram path (kernels.gram) and its Householder fallback -----------------------------

def kaiming_a(rng, L, r, n):
    """LoRA's round-0 A: Kaiming-uniform rows (κ ≈ 1 + 2√(r/n))."""
    bound = 1.0 / np.sqrt(n)
    return torch.tensor(rng.uniform(-bound, bound, size=(L, r, n)), dtype=torch.float32)


def gram_path(B, A):
    """(B', A', redo) from the Gram path, redo marking the layers that fell back."""
    B_out, A_out = torch.empty_like(B), torch.empty_like(A)
    redo = refactorize_gram(B, A, B_out, A_out)
    return B_out, A_out, redo


@pytest.mark.parametrize("a_kind", ["orthonormal", "kaiming"])
def test_gram_path_is_taken_for_fedsvd_factors_and_exact(a_kind):
    rng = np.random.default_rng(20)
    L, m, r, n = 3, 300, 8, 200
    B = torch.tensor(np.stack([conditioned(rng, m, r, 1e6) for _ in range(L)]),
                     dtype=torch.float32)
    if a_kind == "orthonormal":
        A = torch.tensor(np.stack([np.linalg.qr(rng.normal(size=(n, r)))[0].T
                                   for _ in range(L)]), dtype=torch.float32)
    else:
        A = kaiming_a(rng, L, r, n)
    B_new, A_new, redo = gram_path(B, A)
    assert not redo.any()
    assert_refactorized(B, A, B_new, A_new)
    _, _, S_ref = reference_loop(B, A)
    S = torch.linalg.vector_norm(B_new.double(), dim=1).numpy()
    np.testing.assert_allclose(S, S_ref, rtol=1e-4, atol=1e-6 * S_ref[:, :1].max())


@pytest.mark.parametrize("log_cond", [2, 4, 6])
def test_ill_conditioned_a_falls_back_and_stays_exact(log_cond):
    rng = np.random.default_rng(21)
    B, A = factors(rng, 2, 60, 6, 50, cond=10.0**log_cond)
    B_new, A_new, redo = gram_path(B, A)
    assert redo.all()
    assert_refactorized(B, A, B_new, A_new)


def test_fallback_is_per_layer():
    rng = np.random.default_rng(22)
    B, A = factors(rng, 3, 40, 4, 30)
    A[1, 3] = A[1, 0]  # rank-deficient A in layer 1 only
    B_new, A_new, redo = gram_path(B, A)
    assert redo.tolist() == [False, True, False]
    assert_refactorized(B, A, B_new, A_new)


def test_in_place_and_out_with_another_dtype():
    rng = np.random.default_rng(23)
    B, A = factors(rng, 4, 50, 5, 40, cond=3.0)
    expected = refactorize(B, A)
    B_in, A_in = B.clone(), A.clone()
    got = refactorize(B_in, A_in, out=(B_in, A_in))
    assert got[0] is B_in and got[1] is A_in
    torch.testing.assert_close(got, expected)
    out = (torch.empty_like(B, dtype=torch.float64), torch.empty_like(A, dtype=torch.float64))
    refactorize(B, A, out=out)
    torch.testing.assert_close(out[0].float(), expected[0])
    with pytest.raises(ValueError, match="out has shapes"):
        refactorize(B, A, out=(B[:1], A))


def test_fast_and_householder_paths_agree():
    rng = np.random.default_rng(24)
    B, A = factors(rng, 3, 40, 6, 30, cond=100.0)
    A = kaiming_a(rng, 3, 6, 30)
    for got, want in zip(refactorize(B, A), refactorize_householder(B, A), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), m=st.integers(8, 60), n=st.integers(8, 60), r=st.integers(1, 8),
       log_cond=st.floats(0, 6), a_kind=st.sampled_from(["orthonormal", "kaiming"]),
       seed=st.integers(0, 2**16))
def test_gram_path_matches_the_loop_reference(L, m, n, r, log_cond, a_kind, seed):
    rng = np.random.default_rng(seed)
    B = torch.tensor(np.stack([conditioned(rng, m, r, 10**log_cond) for _ in range(L)]),
                     dtype=torch.float32)
    if a_kind == "orthonormal":
        A = torch.tensor(np.stack([np.linalg.qr(rng.normal(size=(n, r)))[0].T
                                   for _ in range(L)]), dtype=torch.float32)
    else:
        A = kaiming_a(rng, L, r, max(n, 8 * r))
    B_new, A_new, redo = gram_path(B, A)
    assert_refactorized(B, A, B_new, A_new)
    _, _, S_ref = reference_loop(B, A)
    S = torch.linalg.vector_norm(B_new.double(), dim=1).numpy()
    np.testing.assert_allclose(S, S_ref, rtol=1e-4, atol=1e-6 * S_ref[:, :1].max())
    assert not redo.any()  # κ(A) ≤ 4 here: the fast path is enough


@pytest.mark.parametrize("kappa", [1.0, 1.4, 3.9])
def test_llama_sized_layer_with_and_without_the_orthonormality_check(kappa):
    # κ(A)² ≤ 2 skips measuring A'A'ᵀ; pin that the a priori bound holds on a 4096-long row
    rng = np.random.default_rng(25)
    L, m, r, n = 2, 1024, 16, 4096
    B = torch.tensor(rng.normal(size=(L, m, r)) * 0.01, dtype=torch.float32)
    A = torch.tensor(np.stack([conditioned(rng, r, n, kappa) for _ in range(L)]) * 0.02,
                     dtype=torch.float32)
    B_new, A_new, redo = gram_path(B, A)
    assert not redo.any()
    assert rel_err(B_new, A_new, B, A) <= 1e-6 and orth_err(A_new) <= 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result():
    rng = np.random.default_rng(26)
    B, A = factors(rng, 3, 64, 8, 48, cond=10.0)
    A = kaiming_a(rng, 3, 8, 48)
    want = refactorize(B, A)
    got = refactorize(B.cuda(), A.cuda())
    assert got[0].device.type == "cuda"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=1e-5, rtol=1e-4)
    B_ill, A_ill = factors(rng, 2, 64, 8, 48, cond=1e4)  # Householder fallback on the device
    assert_refactorized(B_ill, A_ill, *(t.cpu() for t in refactorize(B_ill.cuda(), A_ill.cuda())))
