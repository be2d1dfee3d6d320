"""Merge 16 rank-16 LoRA sources at RoBERTa-large shapes: ours (kernels) vs peft's SVD merge.

    python -m benchmarks.merge_bench [--sources 16] [--rank 16] [--k 16] [--peft-layers 2]
                                     [--repeat 3] [--peft-repeat 3] [--threads N]

Layout: 24 layers × (query, value), 1024 × 1024 (RoBERTa-large). Sources: B (m, r) ~ N(0, c_s²)
with c_s from 0.5 to 2 by source, A (r, n) ~ N(0, 1 / n); alpha = r (scale 1), weights 1.

- ours AXIS: ``merging.merge_pairs`` (top K pooled components, ``kernels.top_components``),
  and ``kernels.top_components`` alone on pre-stacked factors;
- ours task arithmetic: ``merging.task_arithmetic_pairs``, the rank-K truncated SVD of the sum
  from stacked factors: the same operator as peft's svd merge;
  the ``merging`` functions take and return module -> (B, A) dicts (grouping and stacking
  timed); best of --repeat;
- peft: a config-only ``RobertaModel`` with RoBERTa-large shapes (random init, no download)
  holding the sources as adapters; ``add_weighted_adapter(names, weights, "merged",
  combination_type="svd", svd_rank=K)`` forms each dense ΔW, sums them and runs a full
  ``torch.linalg.svd`` per layer (full_matrices=True, its default). On 2 CPU cores that is slow,
  so the model has only --peft-layers encoder layers and the time is scaled by
  24 / --peft-layers (printed as extrapolated; --peft-layers 24 times all of it); best of
  --peft-repeat.

Errors, on one sample layer (layer 0 query), of each result against a float64 dense reference of
its own operator: for AXIS, the SVD of every source's dense delta, the top K pooled triplets
summed and decomposed again; for task arithmetic and peft, the SVD of the float64 sum truncated
to K. Relative Frobenius norm. On a busy 2-core host times inflate: the load is printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import RobertaConfig, RobertaModel
from transformers.utils import logging as hf_logging

from benchmarks.kernels_bench import best_time
from kernels import top_components
from merging import merge_pairs, peft_svd_pairs, task_arithmetic_pairs

LAYERS, WIDTH, TARGETS = 24, 1024, ("query", "value")


def make_sources(count: int, r: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    names = [f"encoder.layer.{i}.attention.self.{t}" for i in range(LAYERS) for t in TARGETS]
    scales = torch.linspace(0.5, 2.0, count)
    return [{name: (scales[s] * torch.randn(WIDTH, r, generator=g),
                    torch.randn(r, WIDTH, generator=g) / WIDTH**0.5) for name in names}
            for s in range(count)]


def peft_model(sources: list[dict], r: int, layers: int):
    """A random-init RoBERTa-large-shaped model with ``layers`` layers and one adapter each."""
    config = RobertaConfig(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=layers,
                           num_attention_heads=16, intermediate_size=4 * WIDTH,
                           max_position_embeddings=64)
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=list(TARGETS))
    model = get_peft_model(RobertaModel(config), lora, adapter_name="s0")
    for s in range(1, len(sources)):
        model.add_adapter(f"s{s}", lora)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "s0" in module.lora_A:
                for s, source in enumerate(sources):
                    B, A = source[name]
                    module.lora_B[f"s{s}"].weight.copy_(B)
                    module.lora_A[f"s{s}"].weight.copy_(A)
    return model


def axis_reference(sources: list[dict], name: str, k: int) -> torch.Tensor:
    """Dense float64 AXIS: SVD each source's B A, pool the triplets, top k by σ, sum, SVD."""
    triplets = []
    for source in sources:
        B, A = source[name]
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        r = B.shape[1]
        triplets += [(S[i].item(), U[:, i], Vh[i]) for i in range(r)]
    triplets.sort(key=lambda t: -t[0])
    return sum(s * torch.outer(u, v) for s, u, v in triplets[:k])


def truncated_sum_reference(sources: list[dict], name: str, k: int) -> torch.Tensor:
    total = sum(B.double() @ A.double() for B, A in (s[name] for s in sources))
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel_err(pair: tuple[torch.Tensor, torch.Tensor], ref: torch.Tensor) -> float:
    B, A = pair
    return ((B.double() @ A.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="rank of every source")
    parser.add_argument("--k", type=int, default=16, help="rank of the merge")
    parser.add_argument("--peft-layers", type=int, default=2, help="encoder layers given to "
                        "peft (its time is scaled to 24)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours (best kept)")
    parser.add_argument("--peft-repeat", type=int, default=3, help="timed runs of peft (best)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a busy host")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    torch.set_grad_enabled(False)
    print(f"{args.sources} sources of rank {args.rank}, {LAYERS} layers × {TARGETS} "
          f"{WIDTH} × {WIDTH}, merged rank {args.k}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    sources = make_sources(args.sources, args.rank)
    cpu = torch.device("cpu")
    t_axis = best_time(lambda: merge_pairs(sources, args.k), cpu, args.repeat)
    t_ta = best_time(lambda: task_arithmetic_pairs(sources, args.k), cpu, args.repeat)
    names = list(sources[0])
    stacks = [(torch.stack([s[n][0] for n in names]), torch.stack([s[n][1] for n in names]))
              for s in sources]  # (48, m, r), (48, r, n): one shape group
    t_top = best_time(lambda: top_components(stacks, args.k), cpu, args.repeat)
    axis, ta = merge_pairs(sources, args.k), task_arithmetic_pairs(sources, args.k)

    model = peft_model(sources, args.rank, args.peft_layers)
    t_peft_part = float("inf")
    for run in range(args.peft_repeat):  # a new adapter name each run: peft skips known ones
        start = time.perf_counter()
        theirs = peft_svd_pairs(model, [f"s{s}" for s in range(args.sources)], args.k,
                                name=f"merged{run}")
        t_peft_part = min(t_peft_part, time.perf_counter() - start)
    t_peft = t_peft_part * LAYERS / args.peft_layers
    note = (f"extrapolated: {t_peft_part:.2f} s for {args.peft_layers} layers × "
            f"{LAYERS / args.peft_layers:g}" if args.peft_layers < LAYERS else "all layers")

    sample = "encoder.layer.0.attention.self.query"
    ref_axis = axis_reference(sources, sample, args.k)
    ref_sum = truncated_sum_reference(sources, sample, args.k)
    print(f"{'method':28s} {'time':>10s} {'peft / this':>12s} {'rel err':>9s}  note")
    rows = [("ours AXIS merge_pairs", t_axis, rel_err(axis[sample], ref_axis),
             "vs float64 dense AXIS pooling; dict in, dict out"),
            ("ours AXIS top_components", t_top, float("nan"), "pre-stacked (no stacking)"),
            ("ours task arithmetic", t_ta, rel_err(ta[sample], ref_sum),
             "vs float64 truncated SVD of the sum"),
            ("peft svd", t_peft, rel_err(theirs[sample], ref_sum), note)]
    for label, t, err, text in rows:
        print(f"{label:28s} {t * 1e3:8.1f}ms {t_peft / t:11.0f}x {err:9.1e}  {text}")


if __name__ == "__main__":
    main()
