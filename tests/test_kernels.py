import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import lowrank_svd, refactorize, refactorize_pairs


def _factors(rng, L, m, r, n, cond=1.0, dtype=torch.float32):
    """Random stacks whose factors have condition number ``cond``."""
    def conditioned(rows, cols):
        u, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
        v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
        s = np.geomspace(1.0, 1.0 / cond, cols)
        return (u * s) @ v.T
    B = np.stack([conditioned(m, r) for _ in range(L)])
    A = np.stack([conditioned(n, r).T for _ in range(L)])
    return torch.tensor(B, dtype=dtype), torch.tensor(A, dtype=dtype)


def _rel_err(B_new, A_new, B, A) -> float:
    M = B.double().numpy() @ A.double().numpy()
    got = B_new.double().numpy() @ A_new.double().numpy()
    return float(np.linalg.norm(got - M) / max(np.linalg.norm(M), 1e-300))


def _orth_err(A_new) -> float:
    A64 = A_new.double()
    eye = torch.eye(A64.shape[1], dtype=torch.float64)
    return float((A64 @ A64.mT - eye).abs().max())


@settings(max_examples=30, deadline=None)
@given(L=st.integers(1, 4), m=st.integers(2, 40), n=st.integers(2, 40), r=st.integers(1, 8),
       log_cond=st.floats(0, 4), seed=st.integers(0, 2**16))
def test_refactorize_matches_dense_svd(L, m, n, r, log_cond, seed):
    r = min(r, m, n)
    B, A = _factors(np.random.default_rng(seed), L, m, r, n, cond=10**log_cond)
    B_new, A_new = refactorize(B, A)
    assert B_new.shape == B.shape and A_new.shape == A.shape and B_new.dtype == torch.float32
    assert _rel_err(B_new, A_new, B, A) <= 1e-5
    assert _orth_err(A_new) <= 1e-5
    for i in range(L):  # per-matrix reference: numpy dense SVD of the formed product
        s = np.linalg.svd(B[i].double().numpy() @ A[i].double().numpy(), compute_uv=False)[:r]
        assert np.allclose(torch.linalg.norm(B_new[i].double(), dim=0).numpy(), s,
                           rtol=1e-4, atol=1e-6 * s[0])


def test_zero_b_gives_zero_b_and_orthonormal_a():
    B, A = _factors(np.random.default_rng(0), 3, 16, 4, 12)
    B_new, A_new = refactorize(torch.zeros_like(B), A)
    assert torch.count_nonzero(B_new) == 0 and not torch.isnan(A_new).any()
    assert _orth_err(A_new) <= 1e-5


def test_identical_clients_rank_one_and_duplicated_columns():
    rng = np.random.default_rng(1)
    B, A = _factors(rng, 2, 20, 6, 15)
    B_dup = B.clone()
    B_dup[:, :, 3:] = B_dup[:, :, :3]  # rank 3 of 6
    B_rank1 = B[:, :, :1] * torch.ones(1, 1, 6)
    for B_def in (B_dup, 0.5 * B_dup + 0.5 * B_dup, B_rank1):
        B_new, A_new = refactorize(B_def, A)
        assert not torch.isnan(B_new).any() and not torch.isnan(A_new).any()
        assert _rel_err(B_new, A_new, B_def, A) <= 1e-5
        assert _orth_err(A_new) <= 1e-5


def test_rank_equal_to_min_dimension_and_batch_of_one():
    B, A = _factors(np.random.default_rng(2), 1, 5, 5, 9)
    B_new, A_new = refactorize(B, A)
    assert _rel_err(B_new, A_new, B, A) <= 1e-5 and _orth_err(A_new) <= 1e-5


def test_rank_above_min_dimension_pads_with_zeros():
    B = torch.randn(2, 3, 5)
    A = torch.randn(2, 5, 7)
    B_new, A_new = refactorize(B, A)
    assert _rel_err(B_new, A_new, B, A) <= 1e-5
    assert torch.count_nonzero(B_new[:, :, 3:]) == 0


def test_sqrt_split_preserves_product_with_orthogonal_rows():
    B, A = _factors(np.random.default_rng(3), 2, 12, 4, 10, cond=10.0)
    B_new, A_new = refactorize(B, A, sigma="sqrt")
    assert _rel_err(B_new, A_new, B, A) <= 1e-5
    gram = A_new.double() @ A_new.double().mT
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert off_diagonal.abs().max() <= 1e-5 * gram.abs().max()
    assert torch.allclose(torch.linalg.norm(B_new.double(), dim=1),
                          torch.linalg.norm(A_new.double(), dim=2), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_are_preserved(dtype):
    B, A = _factors(np.random.default_rng(4), 2, 16, 4, 8, dtype=dtype)
    B_new, A_new = refactorize(B, A)
    assert B_new.dtype == dtype and A_new.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert _rel_err(B_new, A_new, B, A) <= tol


def test_lowrank_svd_truncates_like_numpy():
    B, A = _factors(np.random.default_rng(5), 2, 30, 6, 25, cond=100.0)
    U, S, Vh = lowrank_svd(B, A, k=3)
    for i in range(2):
        M = B[i].double().numpy() @ A[i].double().numpy()
        u, s, vh = np.linalg.svd(M)
        assert np.allclose(S[i].double().numpy(), s[:3], rtol=1e-5)
        approx = (U[i].double() * S[i].double()) @ Vh[i].double()
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert np.linalg.norm(approx.numpy() - best) <= 1e-5 * np.linalg.norm(M)


def test_refactorize_pairs_groups_mixed_shapes_and_keeps_order():
    rng = np.random.default_rng(6)
    shapes = {"q0": (8, 4, 6), "v0": (8, 4, 6), "up": (12, 4, 6), "down": (6, 4, 12)}
    pairs = {}
    for name, (m, r, n) in shapes.items():
        B, A = _factors(rng, 1, m, r, n)
        pairs[name] = (B[0], A[0])
    out = refactorize_pairs(pairs)
    assert list(out) == list(pairs)
    for name, (B_new, A_new) in out.items():
        B, A = pairs[name]
        assert B_new.shape == B.shape and A_new.shape == A.shape
        assert _rel_err(B_new[None], A_new[None], B[None], A[None]) <= 1e-5
        assert _orth_err(A_new[None]) <= 1e-5


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5, 3\) and A \(2, 4, 6\)"):
        refactorize(torch.zeros(2, 5, 3), torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="expected stacks"):
        refactorize(torch.zeros(5, 3), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="sigma='U'"):
        refactorize(torch.zeros(1, 5, 3), torch.zeros(1, 3, 6), sigma="U")
