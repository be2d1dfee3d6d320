"""One client DP-SGD step on LoRA B + head, by path, against today's default, same batch and model.

python -m benchmarks.dp_step_bench [--batch-size 32] [--steps 8] [--device cpu] [--max-length 64]
python -m benchmarks.dp_step_bench --task causal-lm --modes none,hooks,ghost,default,default+bf16

The batch is real: ``--batch-size`` 20 Newsgroups training texts (the default task), tokenized
to ``--max-length`` and padded to it, the same for every mode. ``--task causal-lm`` times the
causal-LM configuration of ``simulations/conf/causal-lm.toml`` instead (SmolLM2-135M, LoRA on
q_proj and v_proj, comp.graphics posts, next-token loss per sequence; batch 8 × 64 tokens).
Modes, each in its own process (so its peak memory, max RSS on CPU or max allocated on CUDA, is
its own):

- ``none``: plain SGD, no DP (float32, fixed padding);
- ``hooks``: Opacus per-sample gradients by hooks, float32, padded to ``--max-length``: the
  default path before dynamic padding and bfloat16 (the reference of the ratios);
- ``ghost``: Opacus ghost clipping;
- ``hooks+trim``: the batch cut to its longest example (:mod:`common.batching`);
- ``hooks+eval``: the frozen encoder without its own dropout (``model.encoder-dropout =
  false``, :func:`common.model.train_mode`);
- ``hooks+eval+lora0``: also ``lora.dropout = 0``;
- ``default``: the default path now in float32: trim, no encoder dropout, ``lora.dropout = 0``;
- ``hooks+bf16``, ``default+bf16``: the frozen encoder under bfloat16 autocast
  (:mod:`common.precision`), timed only where bfloat16 is native unless ``--emulated-bf16``.
  ``model.compute-dtype = auto`` runs ``default+bf16`` where bfloat16 is native and
  ``default`` elsewhere; the first line says which.

``--threads N`` runs every mode (and the matmul peak) with N torch threads: a simulation's
ClientApp gets one per CPU (``--threads 1`` for the default 1 CPU per client).

``--concurrent K`` instead runs K clients at once, each a process stepping the default path
(``default+bf16`` where ``auto`` picks bfloat16, else ``default``) with ``--threads`` torch
threads (after all have built their model, so the timed steps overlap), and prints their joint
examples per second for each thread count given (``--threads 1,2``). Flower's
simulation runs cores / ``client-resources-num-cpus`` ClientApps side by side and Ray gives each
``OMP_NUM_THREADS`` = its CPUs, so ``--concurrent 2 --threads 1`` is two 1-CPU clients on 2 cores
and ``--concurrent 1 --threads 2`` one 2-CPU client.

Prints the median step time, examples per second, the ratio to ``hooks``, peak memory, and what
bounds the step: its FLOPs (counted by ``torch.utils.flop_counter`` on the float32 step) against
this machine's matmul peak measured in the same run (float32 and bfloat16, a 2048 × 384 × 1536
product, the shape of the encoder's feed-forward layer at batch 32 × 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.task_kinds import CLASSIFICATION, TASK_KINDS, TASK_NAMES

MODES = ("none", "hooks", "ghost", "hooks+trim", "hooks+eval", "hooks+eval+lora0", "default",
         "hooks+bf16", "default+bf16")
REFERENCE = "hooks"
ROOT = Path(__file__).resolve().parent.parent
CAUSAL_LM_CONF = ROOT / "simulations" / "conf" / "causal-lm.toml"


def task_config(task: str):
    """The configuration timed: the default run's (classification) or the causal-LM conf's."""
    from common.config import AppConfig
    from common.run_config import app_run_config

    if TASK_KINDS[task].is_classification:
        return AppConfig()
    return AppConfig.from_run_config(app_run_config(ROOT, [str(CAUSAL_LM_CONF)]))


def real_batch(task: str, batch_size: int, max_length: int):
    """``batch_size`` training texts of the task's data, tokenized and padded to max_length.

    Their tensors (:mod:`common.batching`: with segment ids where the tokenizer gives them)
    and the number of classes.
    """
    import torch

    from common.data import load_corpus
    from common.model import load_tokenizer
    from common.tasks import TASKS

    cfg = task_config(task)
    corpus = load_corpus(cfg.data, cfg.seed, cfg.model.task_kind)
    index = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(0))
    texts = corpus.train.select(index[:batch_size].tolist())
    encoded = TASKS[task].encode(texts, load_tokenizer(cfg.model), max_length)
    return encoded.tensors, corpus.num_labels


def build(mode: str, batch_size: int, device: str, max_length: int,
          task: str = CLASSIFICATION.name):
    """Model, private wrapper and the batch of one mode."""
    import dataclasses

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from common.adapter import AdapterLayout
    from common.batching import collate_trimmed, trim
    from common.model import build_model, train_mode
    from common.tasks import TASKS
    from privacy import PrivacyLedger, make_private

    cfg = task_config(task)
    new = mode.startswith("default")
    lora = dataclasses.replace(cfg.lora, dropout=0.0 if new or "lora0" in mode else 0.05)
    tensors, num_labels = real_batch(task, batch_size, max_length)
    model = build_model(cfg.model, lora, num_labels=num_labels, seed=0, device=device)
    layout = AdapterLayout.from_model(model)
    trainable = layout.set_trainable(model, ("B",), train_head=cfg.lora.train_head)
    data = TensorDataset(*tensors)
    private = make_private(
        module=model, optimizer=torch.optim.SGD(trainable, lr=0.1),
        data_loader=DataLoader(data, batch_size=batch_size, collate_fn=collate_trimmed),
        noise_multiplier=0.0 if mode == "none" else 1.0, max_grad_norm=2.0,
        ledger=PrivacyLedger(), grad_sample_mode="ghost" if mode == "ghost" else "hooks",
        criterion=TASKS[task].criterion())
    batch = trim(tensors) if new or "trim" in mode else tensors
    dtype = torch.bfloat16 if "bf16" in mode else torch.float32
    train_mode(private.module, encoder_dropout=not (new or "eval" in mode))
    return private, tuple(t.to(device) for t in batch), dtype


def step(private, batch, dtype, device: str) -> None:
    """One optimizer step on ``batch``."""
    from common.batching import split_batch
    from common.precision import autocast

    inputs, labels = split_batch(batch)
    private.optimizer.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        logits = private.module(**inputs).logits
    loss = private.criterion(logits.float(), labels)
    loss.backward()
    private.optimizer.step()


def run_mode(mode: str, batch_size: int, steps: int, device: str, max_length: int,
             task: str = CLASSIFICATION.name) -> dict:
    """Time ``steps`` steps of one mode in this process (after two warm-up steps)."""
    import torch

    private, batch, dtype = build(mode, batch_size, device, max_length, task)
    times = []
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(private, batch, dtype, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "median_s": statistics.median(times), "peak_bytes": peak,
            "tokens": int(batch[0].shape[1])}


def auto_mode(device: str) -> str:
    """The mode ``model.compute-dtype = auto`` runs on ``device``."""
    from common.precision import native_bfloat16

    return "default+bf16" if native_bfloat16(device) else "default"


def run_concurrent_child(batch_size: int, steps: int, device: str, max_length: int,
                         threads: int, task: str = CLASSIFICATION.name) -> dict:
    """Build the auto mode with ``threads`` torch threads, say ready, wait for a line, time."""
    import torch

    torch.set_num_threads(threads)
    private, batch, dtype = build(auto_mode(device), batch_size, device, max_length, task)
    step(private, batch, dtype, device)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(private, batch, dtype, device)
    return {"seconds": time.perf_counter() - t0}


def concurrent_rate(clients: int, threads: int, args: argparse.Namespace) -> float:
    """Joint examples/s of ``clients`` processes stepping at once, ``threads`` threads each."""
    cmd = [sys.executable, "-m", "benchmarks.dp_step_bench", "--mode", "concurrent-child",
           "--threads", str(threads), "--batch-size", str(args.batch_size), "--steps",
           str(args.steps), "--device", args.device, "--max-length", str(args.max_length),
           "--task", args.task]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(clients)]
    for proc in procs:
        while proc.stdout.readline().strip() != "ready":
            if proc.poll() is not None:
                raise RuntimeError(f"a concurrent client exited with {proc.returncode}")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    seconds = [json.loads(proc.communicate()[0].strip().splitlines()[-1])["seconds"]
               for proc in procs]
    return clients * args.steps * args.batch_size / max(seconds)


def step_flops(batch_size: int, device: str, max_length: int,
               task: str = CLASSIFICATION.name) -> float:
    """FLOPs of one float32 DP-SGD step (hooks), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    private, batch, dtype = build("hooks", batch_size, device, max_length, task)
    counter = FlopCounterMode(display=False)
    with counter:
        step(private, batch, dtype, device)
    return float(counter.get_total_flops())


def matmul_peak(device: str) -> dict[str, float]:
    """GFLOP/s of a 2048 × 384 × 1536 product, float32 and bfloat16, median of 20."""
    import torch

    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(2048, 384, dtype=dtype, device=device)
        b = torch.randn(384, 1536, dtype=dtype, device=device)
        times = []
        for i in range(23):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        out[name] = 2 * 2048 * 384 * 1536 / statistics.median(times) / 1e9
    return out


def main() -> None:
    """Run every mode in a subprocess and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASK_NAMES, default=CLASSIFICATION.name,
                        help="the default run's model and data, or those of "
                             "simulations/conf/causal-lm.toml (SmolLM2-135M)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the task's train.batch-size (32; causal-lm: 8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-length", type=int, default=None,
                        help="default: the task's model.max-length (64)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="also time the bf16 modes where the device has no native bf16 "
                        "(about 100x slower than float32 on an AVX2 CPU)")
    parser.add_argument("--concurrent", type=int, default=0, metavar="K",
                        help="time K concurrent clients (the default path) instead of modes")
    parser.add_argument("--threads", default=None,
                        help="torch threads of each mode's process (default: torch's own); "
                             "with --concurrent: per client, comma-separated (default 1,2)")
    parser.add_argument("--mode", choices=(*MODES, "flops", "concurrent-child"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = task_config(args.task)
    args.batch_size = args.batch_size or cfg.train.batch_size
    args.max_length = args.max_length or cfg.model.max_length
    if args.mode in (*MODES, "flops") and args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
    if args.mode == "concurrent-child":
        print(json.dumps(run_concurrent_child(args.batch_size, args.steps, args.device,
                                              args.max_length, int(args.threads),
                                              args.task)))
        return
    if args.concurrent:
        args.threads = args.threads or "1,2"
        print(f"{args.concurrent} concurrent clients, {auto_mode(args.device)}, batch "
              f"{args.batch_size}, "
              f"max length {args.max_length}, {args.steps} steps each, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        rates = {int(t): concurrent_rate(args.concurrent, int(t), args)
                 for t in args.threads.split(",")}
        first = next(iter(rates.values()))
        for threads, rate in rates.items():
            print(f"  {threads} torch thread(s) each: {rate:.1f} examples/s jointly "
                  f"({rate / first:.2f}x the first)")
        return
    if args.mode == "flops":
        print(json.dumps({"flops": step_flops(args.batch_size, args.device, args.max_length,
                                              args.task),
                          "peak": matmul_peak(args.device)}))
        return
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.batch_size, args.steps, args.device,
                                  args.max_length, args.task)))
        return

    def child(mode: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.dp_step_bench", "--mode", mode,
             "--batch-size", str(args.batch_size), "--steps", str(args.steps),
             "--device", args.device, "--max-length", str(args.max_length),
             "--task", args.task, *(["--threads", args.threads] if args.threads else [])],
            capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    from common.precision import native_bfloat16

    native = native_bfloat16(args.device)
    modes = [m for m in args.modes.split(",") if m]
    skipped = [m for m in modes if "bf16" in m and not native and not args.emulated_bf16]
    results = {mode: child(mode) for mode in modes if mode not in skipped}
    bound = child("flops")
    base = results[REFERENCE]["median_s"] if REFERENCE in results else None
    what = ("MiniLM + LoRA r=8 (q, v) + head" if TASK_KINDS[args.task].is_classification else
            "SmolLM2-135M (dequantized Q4_1) + LoRA r=8 (q_proj, v_proj), causal LM")
    print(f"{what}, batch {args.batch_size} real 20 Newsgroups texts, "
          f"max length {args.max_length}, device {args.device}, torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, "
          f"native bfloat16: {'yes' if native else 'no'} (model.compute-dtype=auto runs "
          f"{auto_mode(args.device)} here); median of {args.steps} steps")
    print(f"{'mode':<17}{'tokens':>7}{'step':>9}{'examples/s':>12}{'vs hooks':>10}"
          f"{'peak memory':>13}")
    for mode, r in results.items():
        ratio = f"{base / r['median_s']:.2f}x" if base else "-"
        print(f"{mode:<17}{r['tokens']:>7}{r['median_s'] * 1e3:>7.0f}ms"
              f"{args.batch_size / r['median_s']:>12.1f}{ratio:>10}"
              f"{r['peak_bytes'] / 2**20:>9.0f} MiB")
    for mode in skipped:
        print(f"{mode:<17}  not timed: {args.device} has no native bfloat16 (see the matmul "
              "peak below; --emulated-bf16 times it)")
    flops, peak = bound["flops"], bound["peak"]
    per_example = flops / args.batch_size / 1e9
    print(f"bound: a float32 step is {flops / 1e9:.1f} GFLOP ({per_example:.2f} per example, "
          f"counted); measured matmul peak {peak['float32']:.0f} GFLOP/s float32, "
          f"{peak['bfloat16']:.0f} GFLOP/s bfloat16")
    for mode in (REFERENCE, "default", "default+bf16"):
        if mode in results:
            rate = flops / results[mode]["median_s"] / 1e9
            dtype = "bfloat16" if "bf16" in mode else "float32"
            print(f"  {mode}: {rate:.0f} GFLOP/s = {rate / peak[dtype]:.0%} of the {dtype} peak")

if __name__ == "__main__":
    main()
