"""kernels.top_components / add_source against dense float64 numpy sums and SVDs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import add_source, top_components


def source(rng, L, m, r, n, scale=1.0):
    B = torch.tensor(rng.normal(size=(L, m, r)) * scale, dtype=torch.float32)
    A = torch.tensor(rng.normal(size=(L, r, n)) / np.sqrt(n), dtype=torch.float32)
    return B, A


def dense(B, A):
    return B.double().numpy() @ A.double().numpy()


def product(f):
    return (f.U.double() * f.S.double()[:, None, :]) @ f.Vh.double()


def pooled_reference(sources, k, weights, rank_by):
    """Per-layer dense reference: SVD each M_s, pool triplets, keep top k, sum, SVD again."""
    out = []
    for layer in range(sources[0][0].shape[0]):
        triplets = []
        for t, ((B, A), w) in enumerate(zip(sources, weights, strict=True)):
            u, s, vh = np.linalg.svd(dense(B[layer], A[layer]), full_matrices=False)
            s = s[:B.shape[2]]
            for i, sv in enumerate(s):
                quota = i < k // len(sources)  # quota: own top first, then raw σ
                score = {"sigma": abs(w) * sv, "normalized": sv / s[0] if s[0] > 0 else 0.0,
                         "quota": (1e30 if quota else 0.0) + abs(w) * sv}[rank_by]
                triplets.append((score, abs(w) * sv, t, i, w * sv * np.outer(u[:, i], vh[i])))
        triplets.sort(key=lambda x: (-x[0], -x[1], x[2], x[3]))  # ties: larger |w|σ, then order
        out.append(sum(x[4] for x in triplets[:k]))
    return np.stack(out)


def assert_svd_factors(f, L, m, k, n):
    assert f.U.shape == (L, m, k) and f.S.shape == (L, k) and f.Vh.shape == (L, k, n)
    eye = np.eye(k)
    assert np.abs(f.U.double().mT.numpy() @ f.U.double().numpy() - eye).max() <= 1e-5
    assert np.abs(f.Vh.double().numpy() @ f.Vh.double().mT.numpy() - eye).max() <= 1e-5
    assert (np.diff(f.S.double().numpy(), axis=1) <= 1e-7).all()


@pytest.mark.parametrize("rank_by", ["sigma", "normalized"])
def test_top_components_matches_dense_pooling(rank_by):
    rng = np.random.default_rng(0)
    L, m, n = 2, 30, 25
    sources = [source(rng, L, m, 4, n), source(rng, L, m, 3, n, scale=3.0),
               source(rng, L, m, 5, n, scale=0.5)]
    weights = [1.0, 0.5, 2.0]
    f = top_components(sources, k=6, rank_by=rank_by, weights=weights)
    assert_svd_factors(f, L, m, 6, n)
    want = pooled_reference(sources, 6, weights, rank_by)
    got = product(f).numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    for layer in range(L):  # S is the SVD of the pooled sum
        s = np.linalg.svd(want[layer], compute_uv=False)[:6]
        np.testing.assert_allclose(f.S[layer].double().numpy(), s, rtol=1e-5)


def test_sources_are_left_alone_unless_overwrite_is_asked():
    rng = np.random.default_rng(4)
    sources = [source(rng, 2, 30, 4, 25), source(rng, 2, 30, 3, 25, scale=2.0)]
    copies = [(B.clone(), A.clone()) for B, A in sources]
    kept = top_components(sources, k=5)
    for (B, A), (B0, A0) in zip(sources, copies, strict=True):
        assert torch.equal(B, B0) and torch.equal(A, A0)
    overwritten = top_components(sources, k=5, overwrite_sources=True)
    np.testing.assert_allclose(product(overwritten).numpy(), product(kept).numpy(), atol=1e-6)
    assert not torch.equal(sources[0][0], copies[0][0])  # refactorized in place


def test_quota_keeps_every_sources_top_components():
    rng = np.random.default_rng(1)
    big, small = source(rng, 1, 20, 4, 18, scale=100.0), source(rng, 1, 20, 4, 18, scale=0.01)
    f_sigma = top_components([big, small], k=4, rank_by="sigma")
    f_quota = top_components([big, small], k=4, rank_by="quota")
    # raw σ keeps only the big source; the quota keeps the top two of each
    assert np.linalg.norm(product(f_sigma).numpy() - dense(*big)) <= 1e-5 * 100
    want = pooled_reference([big, small], 4, [1.0, 1.0], "quota")
    assert np.linalg.norm(product(f_quota).numpy() - want) <= 1e-5 * np.linalg.norm(want)
    assert np.linalg.norm(product(f_quota).numpy() - dense(*big)) > 1e-3


def test_all_components_give_the_exact_sum():
    rng = np.random.default_rng(2)
    sources = [source(rng, 2, 40, 3, 30) for _ in range(3)]
    f = top_components(sources, k=9)
    want = sum(dense(B, A) for B, A in sources)
    assert np.linalg.norm(product(f).numpy() - want) <= 1e-5 * np.linalg.norm(want)


def test_add_source_equals_merging_from_scratch():
    rng = np.random.default_rng(3)
    sources = [source(rng, 2, 40, 3, 30) for _ in range(3)]
    f = top_components(sources[:1], k=3)
    f = add_source(f, *sources[1], k=6)
    f = add_source(f, *sources[2], k=9, weight=1.0)
    assert_svd_factors(f, 2, 40, 9, 30)
    scratch = top_components(sources, k=9)
    want = product(scratch).numpy()
    assert np.linalg.norm(product(f).numpy() - want) <= 1e-5 * np.linalg.norm(want)
    torch.testing.assert_close(f.S, scratch.S, rtol=1e-5, atol=1e-6)


def test_add_source_truncates_like_a_dense_svd():
    rng = np.random.default_rng(4)
    (B1, A1), (B2, A2) = source(rng, 2, 30, 4, 25), source(rng, 2, 30, 4, 25)
    f = add_source(top_components([(B1, A1)], k=4), B2, A2, k=3, weight=-0.5)
    for layer in range(2):
        M = dense(B1, A1)[layer] - 0.5 * dense(B2, A2)[layer]
        u, s, vh = np.linalg.svd(M)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert np.linalg.norm(product(f)[layer].numpy() - best) <= 1e-5 * np.linalg.norm(M)


def test_add_source_with_zero_or_redundant_source_stays_orthonormal():
    rng = np.random.default_rng(5)
    B, A = source(rng, 1, 30, 3, 25)
    f = top_components([(B, A)], k=3)
    for extra in [(torch.zeros_like(B), A), (B, A)]:
        g = add_source(f, *extra, k=6)
        assert_svd_factors(g, 1, 30, 6, 25)
        want = dense(B, A) + dense(*extra)
        assert np.linalg.norm(product(g).numpy() - want) <= 1e-5 * np.linalg.norm(want)


def test_merge_argument_errors():
    rng = np.random.default_rng(6)
    s1 = source(rng, 1, 10, 2, 8)
    with pytest.raises(ValueError, match="k=5"):
        top_components([s1, s1], k=5)
    with pytest.raises(ValueError, match="rank_by='max'"):
        top_components([s1], k=1, rank_by="max")
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        top_components([s1], k=1, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="does not match"):
        top_components([s1, source(rng, 1, 11, 2, 8)], k=1)
    with pytest.raises(ValueError, match="exceeds min"):
        add_source(top_components([s1], k=2), *source(rng, 1, 10, 8, 8), k=3)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 3), m=st.integers(2, 24), n=st.integers(2, 24),
       ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       duplicate=st.booleans(), deficient=st.booleans(),
       rank_by=st.sampled_from(["sigma", "normalized", "quota"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_top_components_property_against_numpy(L, m, n, ranks, data, duplicate, deficient,
                                               rank_by, dtype, seed):
    """Any shapes and ranks, duplicated and rank-deficient sources, float32 and float64."""
    rng = np.random.default_rng(seed)
    sources = [source(rng, L, m, r, n) for r in ranks]
    if duplicate:  # an exact copy of the first source
        sources.append((sources[0][0].clone(), sources[0][1].clone()))
    if deficient:  # the last source loses a direction: a zero column of B
        B, A = sources[-1]
        B = B.clone()
        B[:, :, 0] = 0
        sources[-1] = (B, A)
    sources = [(B.to(dtype), A.to(dtype)) for B, A in sources]
    total = sum(min(B.shape[2], m, n) for B, _ in sources)
    k = data.draw(st.integers(1, min(total, m, n)), label="k")
    weights = [float(w) for w in rng.uniform(0.5, 2.0, size=len(sources))]
    f = top_components(sources, k=k, rank_by=rank_by, weights=weights)
    assert f.U.dtype == dtype and f.Vh.dtype == dtype
    assert torch.isfinite(f.S).all()
    want = pooled_reference(sources, k, weights, rank_by)
    got = product(f).numpy()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert np.linalg.norm(got - want) <= tol * max(np.linalg.norm(want), 1e-30)
    k0, r_last = min(ranks[0], m, n), sources[-1][0].shape[2]
    if k0 + r_last <= min(m, n):  # Brand's update keeps everything: exactly the sum
        g = add_source(top_components(sources[:1], k=k0), *sources[-1], k=k0 + r_last,
                       weight=weights[-1])
        dense_sum = dense(*sources[0]) + weights[-1] * dense(*sources[-1])
        assert np.linalg.norm(product(g).numpy() - dense_sum) <= tol * 10 * max(
            np.linalg.norm(dense_sum), 1e-30)
