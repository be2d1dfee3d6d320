"""merging/: AXIS merge, incremental add, peft round trip, full-model and base_delta sources."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from test_kernels_merge import pooled_reference
from transformers import BertForSequenceClassification

from merging import add_pairs, load_sources, merge_adapters, merge_pairs, save_merged

MODULES = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
           for p in ("query", "value")]


def random_pairs(rng, r, m=32, n=32, scale=1.0, modules=MODULES):
    return {mod: (torch.tensor(rng.normal(size=(m, r)) * scale, dtype=torch.float32),
                  torch.tensor(rng.normal(size=(r, n)) / np.sqrt(n), dtype=torch.float32))
            for mod in modules}


def product(pair):
    B, A = pair
    return B.double().numpy() @ A.double().numpy()


def rel_err(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def pooled(sources, module, k, weights=None, rank_by="sigma"):
    """Dense float64 AXIS reference of one module (kernels' test reference)."""
    stacks = [(B[None], A[None]) for B, A in (s[module] for s in sources)]
    return pooled_reference(stacks, k, weights or [1.0] * len(sources), rank_by)[0]


def write_adapter(folder, pairs, r, alpha, *, rslora=False, base="tiny-bert", head=True):
    """A peft adapter folder written by hand: scale alpha / r (or alpha / √r), a head."""
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=["query", "value"], use_rslora=rslora,
               base_model_name_or_path=base,
               modules_to_save=["classifier"] if head else None).save_pretrained(folder)
    tensors = {}
    for module, (B, A) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    if head:
        tensors["base_model.model.classifier.weight"] = torch.zeros(3, 32)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def orthogonal_sources(rng, ranks, m=40, n=30, modules=("a", "b")):
    """Sources whose column and row spaces are mutually orthogonal, disguised by a random R."""
    total = sum(ranks)
    out = [{} for _ in ranks]
    for module in modules:
        U = np.linalg.qr(rng.normal(size=(m, total)))[0]
        V = np.linalg.qr(rng.normal(size=(n, total)))[0]
        sigma = rng.uniform(0.5, 5.0, total)  # distinct: no tie at the K boundary
        start = 0
        for s, r in enumerate(ranks):
            cols = slice(start, start + r)
            R = rng.normal(size=(r, r)) + 3 * np.eye(r)
            B = (U[:, cols] * sigma[cols]) @ R
            A = np.linalg.solve(R, V[:, cols].T)
            out[s][module] = (torch.tensor(B, dtype=torch.float32),
                              torch.tensor(A, dtype=torch.float32))
            start += r
    return out


def best_rank_k(M, k):
    u, s, vh = np.linalg.svd(M)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_orthogonal_sources_give_the_exact_truncation():
    rng = np.random.default_rng(0)
    sources = orthogonal_sources(rng, [3, 4, 2])
    weights = [1.0, 0.5, 2.0]
    merged = merge_pairs(sources, k=5, weights=weights)
    for module in ("a", "b"):
        total = sum(w * product(s[module]) for s, w in zip(sources, weights, strict=True))
        assert rel_err(product(merged[module]), best_rank_k(total, 5)) <= 1e-5


@pytest.mark.parametrize("rank_by", ["sigma", "normalized", "quota"])
def test_merged_factors_are_orthonormal_and_match_the_dense_pooling(rank_by):
    rng = np.random.default_rng(1)
    sources = [random_pairs(rng, 4), random_pairs(rng, 2, scale=3.0),
               random_pairs(rng, 6, scale=0.2)]
    merged = merge_pairs(sources, k=6, rank_by=rank_by, weights=[1.0, 0.5, 2.0])
    for module, (B, A) in merged.items():
        assert B.shape == (32, 6) and A.shape == (6, 32)
        np.testing.assert_allclose(A.double() @ A.double().T, np.eye(6), atol=1e-5)
        gram = (B.double().T @ B.double()).numpy()  # diag(S²): orthogonal columns
        S = np.sqrt(np.diag(gram))
        np.testing.assert_allclose(gram / np.outer(S, S), np.eye(6), atol=1e-5)
        assert (np.diff(S) <= 1e-6 * S[0]).all()
        want = pooled(sources, module, 6, [1.0, 0.5, 2.0], rank_by)
        assert rel_err(product((B, A)), want) <= 1e-5


def test_add_equals_merging_from_scratch():
    rng = np.random.default_rng(2)
    s1, s2, s3 = random_pairs(rng, 3), random_pairs(rng, 4), random_pairs(rng, 2, scale=2.0)
    # nothing dropped: rank K₀ + r grows to all components
    grown = add_pairs(merge_pairs([s1, s2], k=7), s3, k=9, weight=0.5)
    scratch = merge_pairs([s1, s2, s3], k=9, weights=[1.0, 1.0, 0.5])
    for module in MODULES:
        assert rel_err(product(grown[module]), product(scratch[module])) <= 1e-5
    # truncated to a fixed K: equal when the new source is orthogonal to the merge
    o1, o2, o3 = orthogonal_sources(rng, [3, 3, 3])
    added = add_pairs(merge_pairs([o1, o2], k=4), o3, k=4)
    scratch = merge_pairs([o1, o2, o3], k=4)
    for module in ("a", "b"):
        assert rel_err(product(added[module]), product(scratch[module])) <= 1e-5


def trained_adapter(model_dir, folder, rng, r, alpha, rslora=False):
    """A real peft adapter on the tiny BERT, with random (nonzero) B, saved by peft."""
    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                            target_modules=["query", "value"],
                                            modules_to_save=["classifier"]))
    deltas = {}
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(
                    int(rng.integers(1 << 30))))
                deltas[name] = module.get_delta_weight("default").double().numpy()
    model.save_pretrained(folder)
    return deltas


def test_merged_adapter_loads_with_peft(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(3)
    d1 = trained_adapter(tiny_model_dir, tmp_path / "a", rng, r=4, alpha=8)
    d2 = trained_adapter(tiny_model_dir, tmp_path / "b", rng, r=2, alpha=4, rslora=True)
    sources = load_sources([tmp_path / "a", tmp_path / "b"], base=tiny_model_dir)
    for source, deltas in ((sources[0], d1), (sources[1], d2)):  # scales honoured
        for module, want in deltas.items():
            assert rel_err(source.delta(module).double().numpy(), want) <= 1e-6
    merged = merge_adapters(sources, rank=4)
    save_merged(tmp_path / "merged", merged)
    base = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "merged")
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.modules_to_save) == (4, 4, None)
    assert set(config.target_modules) == {"query", "value"}
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(MODULES)
    for name, layer in layers.items():
        got = layer.get_delta_weight("default").double().numpy()
        np.testing.assert_allclose(got, product(merged.pairs[name]), rtol=0, atol=1e-6)
        assert rel_err(got, pooled([s.lora for s in sources], name, 4)) <= 1e-5


def test_full_model_source_is_its_difference_from_the_base(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(4)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    state = model.state_dict()
    perturbation = {m: torch.tensor(rng.normal(size=(32, 2)) @ rng.normal(size=(2, 32)),
                    dtype=torch.float32) for m in MODULES}
    with torch.no_grad():
        for module, P in perturbation.items():
            state[f"{module}.weight"] += P
        state["bert.encoder.layer.0.attention.self.key.weight"] += 1.0  # not targeted
    model.save_pretrained(tmp_path / "ft")
    (full,) = load_sources([tmp_path / "ft"], base=tiny_model_dir,
                           target_modules=["query", "value"])
    assert full.kind == "full" and set(full.shapes) == set(MODULES)
    for module, P in perturbation.items():
        torch.testing.assert_close(full.delta(module), P, atol=1e-5, rtol=0)
    adapter = write_adapter(tmp_path / "ad", random_pairs(rng, 3), r=3, alpha=6,
                            base=str(tiny_model_dir))
    full, lora = load_sources([tmp_path / "ft", adapter], base=tiny_model_dir)
    merged = merge_adapters([full, lora], rank=4)  # P has rank 2 ≤ dense_rank: exact
    exact = {m: (P, torch.eye(32)) for m, P in perturbation.items()}
    for module in MODULES:
        want = pooled([exact, lora.lora], module, 4)
        assert rel_err(product(merged.pairs[module]), want) <= 1e-5
    only_full = merge_adapters([load_sources([tmp_path / "ft"], base=tiny_model_dir,
                                             target_modules=["query", "value"])[0]], rank=2)
    save_merged(tmp_path / "merged", only_full)
    base = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "merged")
    for name, layer in loaded.base_model.model.named_modules():
        if isinstance(layer, LoraLayer):
            np.testing.assert_allclose(layer.get_delta_weight("default").double().numpy(),
                                       perturbation[name].double().numpy(), atol=1e-5)


def test_base_delta_is_part_of_the_source(tmp_path):
    rng = np.random.default_rng(5)
    pairs = random_pairs(rng, 2)
    folder = write_adapter(tmp_path / "flora", pairs, r=2, alpha=4)
    dense = {m: torch.tensor(rng.normal(size=(32, 32)), dtype=torch.float32) for m in MODULES}
    save_file({f"base.{m}.weight": d for m, d in dense.items()},
              folder / "base_delta.safetensors")
    (source,) = load_sources([folder])
    factors = source.factors(dense_rank=32)
    for module in MODULES:
        want = dense[module].double().numpy() + 2.0 * product(pairs[module])
        assert rel_err(source.delta(module).double().numpy(), want) <= 1e-6
        assert rel_err(product(factors[module]), want) <= 1e-5
    merged = merge_adapters([source], rank=5)
    for module in MODULES:
        want = dense[module].double().numpy() + 2.0 * product(pairs[module])
        assert rel_err(product(merged.pairs[module]), best_rank_k(want, 5)) <= 1e-5


def test_base_checkpoint_without_the_task_prefix(tiny_model_dir, tmp_path):
    """A BertModel base (``encoder...``) serves BertFor... sources (``bert.encoder...``)."""
    rng = np.random.default_rng(6)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model.bert.save_pretrained(tmp_path / "bare")
    P = torch.tensor(rng.normal(size=(32, 32)), dtype=torch.float32)
    with torch.no_grad():
        model.state_dict()[f"{MODULES[0]}.weight"] += P
    model.save_pretrained(tmp_path / "ft")
    adapter = write_adapter(tmp_path / "ad", random_pairs(rng, 2), r=2, alpha=2)
    full, _ = load_sources([tmp_path / "ft", adapter], base=tmp_path / "bare")
    torch.testing.assert_close(full.delta(MODULES[0]), P, atol=1e-5, rtol=0)
    assert float(full.delta(MODULES[1]).abs().max()) == 0.0
    (only,) = load_sources([tmp_path / "ft"], base=tmp_path / "bare",
                           target_modules=["query", "value"])
    assert set(only.shapes) == set(MODULES)  # named as the fine-tune stores them
