"""One client DP-SGD step on LoRA B (+ head) vs the same step without DP, same batch and model.

python -m benchmarks.dp_step_bench [--batch-size 32] [--steps 8] [--device cpu]

Modes: ``none`` (plain SGD), ``hooks`` (Opacus per-sample gradients by hooks), ``ghost``
(Opacus ghost clipping, with the criterion make_private returns). Each mode runs in its own
process so its peak memory (max RSS on CPU, max allocated on CUDA) is its own. Prints the median
step time, the ratio to ``none``, and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("none", "hooks", "ghost")


def run_mode(mode: str, batch_size: int, steps: int, device: str) -> dict:
    """Time ``steps`` steps of one mode in this process."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from common.adapter import AdapterLayout
    from common.config import AppConfig
    from common.model import build_model
    from privacy import PrivacyLedger, make_private

    cfg = AppConfig()
    model = build_model(cfg.model, cfg.lora, num_labels=20, seed=0, device=device)
    layout = AdapterLayout.from_model(model)
    trainable = layout.set_trainable(model, ("B",), train_head=True)
    gen = torch.Generator().manual_seed(0)
    n = batch_size * 8
    data = TensorDataset(torch.randint(1000, 30000, (n, cfg.model.max_length), generator=gen),
                         torch.ones(n, cfg.model.max_length, dtype=torch.long),
                         torch.randint(0, 20, (n,), generator=gen))
    private = make_private(
        module=model, optimizer=torch.optim.SGD(trainable, lr=0.1),
        data_loader=DataLoader(data, batch_size=batch_size),
        noise_multiplier=0.0 if mode == "none" else 1.0, max_grad_norm=2.0,
        ledger=PrivacyLedger(), grad_sample_mode="hooks" if mode == "none" else mode,
    )
    # The same fixed batch for every mode and step (Poisson batch sizes would add noise).
    input_ids, mask, labels = (t[:batch_size].to(device) for t in data.tensors)
    private.module.train()  # Opacus captures activations only in training mode
    times = []
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        private.optimizer.zero_grad(set_to_none=True)
        loss = private.criterion(private.module(input_ids=input_ids,
                                                attention_mask=mask).logits, labels)
        loss.backward()
        private.optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "median_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    """Run every mode in a subprocess and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.batch_size, args.steps, args.device)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.dp_step_bench", "--mode", mode,
             "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--device", args.device], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["none"]["median_s"]
    print(f"MiniLM + LoRA r=8 (q, v) + head, batch {args.batch_size} x 64 tokens, "
          f"device {args.device}, median of {args.steps} steps")
    print(f"{'mode':<8}{'step':>10}{'vs no DP':>10}{'peak memory':>14}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['median_s'] * 1e3:>8.0f}ms{r['median_s'] / base:>9.2f}x"
              f"{r['peak_bytes'] / 2**20:>11.0f} MiB")


if __name__ == "__main__":
    main()
