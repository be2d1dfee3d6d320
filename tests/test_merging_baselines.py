"""merging baselines: task arithmetic and TIES against hand / numpy results, peft's svd merge."""

import numpy as np
import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties
from test_merging import MODULES, best_rank_k, product, random_pairs, rel_err, trained_adapter
from transformers import BertForSequenceClassification

from merging import load_sources, peft_svd, task_arithmetic, task_arithmetic_pairs, ties_delta


def test_task_arithmetic_is_the_truncated_weighted_sum():
    rng = np.random.default_rng(20)
    sources = [random_pairs(rng, 3), random_pairs(rng, 5, scale=2.0), random_pairs(rng, 2)]
    weights = [0.5, 1.0, -2.0]
    merged = task_arithmetic_pairs(sources, k=4, weights=weights)
    for module in MODULES:
        total = sum(w * product(s[module]) for s, w in zip(sources, weights, strict=True))
        assert rel_err(product(merged[module]), best_rank_k(total, 4)) <= 1e-5
    full = task_arithmetic_pairs(sources, k=10, weights=weights)  # every component: the sum
    total = sum(w * product(s[MODULES[0]]) for s, w in zip(sources, weights, strict=True))
    assert rel_err(product(full[MODULES[0]]), total) <= 1e-5


def test_ties_by_hand():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-4.0, 1.5], [1.0, -0.5]])
    t3 = torch.tensor([[2.0, -3.0], [0.1, 1.0]])
    # density 0.5 keeps two entries each: {3, 2}, {-4, 1.5}, {2, -3}; kept sums 1, -1.5, 0, 2
    # elect +, -, + (a zero sum), +; disjoint means (3 + 2) / 2, -3, none kept, 2
    torch.testing.assert_close(ties_delta([t1, t2, t3], 0.5), torch.tensor([[2.5, -3.0],
                                                                             [0.0, 2.0]]))
    # weight 2 on t2: its kept -8 outvotes 3 + 2, and its 3 ties -3 at 0, elected +
    torch.testing.assert_close(ties_delta([t1, t2, t3], 0.5, weights=[1.0, 2.0, 1.0]),
                               torch.tensor([[-8.0, 3.0], [0.0, 2.0]]))
    # density 1 keeps everything: the mean of the entries that agree with the sum's sign
    want = np.zeros((2, 2))
    stack = np.stack([t.numpy() for t in (t1, t2, t3)])
    for i in range(2):
        for j in range(2):
            v = stack[:, i, j]
            sign = 1.0 if v.sum() >= 0 else -1.0
            want[i, j] = v[np.sign(v) == sign].mean()
    np.testing.assert_allclose(ties_delta([t1, t2, t3], 1.0).numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="density=0"):
        ties_delta([t1], 0.0)


def test_ties_matches_peft_with_equal_weights():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(16, 12, generator=g, dtype=torch.float64) for _ in range(4)]
    want = peft_ties(deltas, torch.ones(4, dtype=torch.float64), density=0.3)
    torch.testing.assert_close(ties_delta(deltas, 0.3), want)


def test_peft_svd_wrapper_equals_our_task_arithmetic(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(21)
    trained_adapter(tiny_model_dir, tmp_path / "a", rng, r=4, alpha=8)
    trained_adapter(tiny_model_dir, tmp_path / "b", rng, r=2, alpha=2)
    sources = load_sources([tmp_path / "a", tmp_path / "b"])
    base = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    theirs = peft_svd(sources, base, rank=3, weights=[1.0, 0.5])
    ours = task_arithmetic(sources, rank=3, weights=[1.0, 0.5])
    assert set(theirs.pairs) == set(MODULES)
    for module in MODULES:
        assert rel_err(product(theirs.pairs[module]), product(ours.pairs[module])) <= 1e-5
