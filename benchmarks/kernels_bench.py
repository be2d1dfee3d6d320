"""Time FedSVD's refactorization of every LoRA layer: dense SVD, svd_lowrank, and kernels/.

    python -m benchmarks.kernels_bench [--device cpu|cuda] [--layouts minilm,roberta,llama]

For each layout it prints the time and the worst relative error ‖B'A' − BA‖_F / ‖BA‖_F (and the
worst |A'A'ᵀ − I|) of: (a) a per-layer loop of dense ``torch.linalg.svd(B @ A)``; (b) a per-layer
loop of ``torch.svd_lowrank(B @ A, q=r, niter=2)`` (the paper's randomized variant); (c) ours,
``kernels.refactorize_pairs`` (stacks per shape group, then refactorizes in place) and
``kernels.refactorize`` on pre-stacked factors (new outputs, and in place). The memory floor is
the time to copy the factors once (bytes of B and A read once and written once), from a warm
256 MB ``copy_``. Dense SVD is timed on a sample of layers and extrapolated; above
--dense-max-elems elements per matrix it is not run at all and its time is extrapolated from the
largest timed shape by the O(m n min(m, n)) cost of an SVD (both are labelled). In-place runs
start from the original factors each time (restored untimed). On a busy 2-core host, OpenMP
barriers inflate every time several-fold: compare runs at a similar load average (printed), or
use --threads 1.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch

from kernels import refactorize, refactorize_pairs

LAYOUTS = {  # name -> [(layers in the group, m, r, n)]
    "minilm": [(12, 384, 8, 384)],  # 6 layers × (query, value)
    "roberta": [(48, 1024, 8, 1024)],  # 24 layers × (query, value)
    "llama": [(128, 4096, 16, 4096), (64, 11008, 16, 4096), (32, 4096, 16, 11008)],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, repeat: int,
              warmup: bool = True, setup: Callable[[], object] = lambda: None) -> float:
    """Best wall time of ``fn`` over ``repeat`` runs; ``setup`` runs untimed before each."""
    if warmup:
        setup()
        fn()
    times = []
    for _ in range(repeat):
        setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def make_layout(spec, device, a_init: str, seed: int = 0):
    """Stacks per shape group: B̄ ~ N(0, 0.01²); A orthonormal (steady state), Kaiming or κ 1e4."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    groups = []
    for L, m, r, n in spec:
        B = 0.01 * torch.randn(L, m, r, generator=g)
        if a_init == "kaiming":
            A = (2 * torch.rand(L, r, n, generator=g) - 1) / math.sqrt(n)
        else:
            A = torch.linalg.qr(torch.randn(L, n, r, generator=g))[0].mT.contiguous()
        if a_init == "ill-conditioned":  # κ(A) = 1e4: every layer takes the Householder path
            A = A * torch.logspace(0, -4, r)[None, :, None]
        groups.append((B.to(device), A.to(device)))
    return groups


def errors(B, A, B_new, A_new) -> tuple[float, float]:
    """Worst relative product error and orthonormality error over a stack, without B A dense.

    ‖P Q‖_F² = Σ (PᵀP) ∘ (Q Qᵀ) with P = [B', B], Q = [A'; −A], all in float64.
    """
    P = torch.cat([B_new, B], dim=2).double()  # (L, m, 2r)
    Q = torch.cat([A_new, -A], dim=1).double()  # (L, 2r, n)
    diff = ((P.mT @ P) * (Q @ Q.mT)).sum(dim=(1, 2)).clamp_min(0)
    Bd, Ad = B.double(), A.double()
    ref = ((Bd.mT @ Bd) * (Ad @ Ad.mT)).sum(dim=(1, 2))
    rel = (diff / ref).sqrt().max().item()
    eye = torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
    orth = (A_new.double() @ A_new.double().mT - eye).abs().max().item()
    return rel, orth


def per_layer(method: str, B: torch.Tensor, A: torch.Tensor):
    """One layer the library way: form M = B A, then dense or randomized SVD."""
    r = B.shape[1]
    M = B @ A  # (m, n)
    if method == "dense":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(M, q=r, niter=2)
        Vh = V.mT
    return U[:, :r] * S[:r], Vh[:r]


def time_loop(method, groups, device, sample, repeat):
    """Per-layer loop over `sample` layers of each group, extrapolated to all layers."""
    total, rel, orth, sampled = 0.0, 0.0, 0.0, True
    for B, A in groups:
        k = min(sample, B.shape[0]) if sample > 0 else B.shape[0]

        def loop(B=B, A=A, k=k):
            return [per_layer(method, B[i], A[i]) for i in range(k)]

        per_layer(method, B[0], A[0])  # warm-up on one layer only: these loops are slow
        total += best_time(loop, device, repeat, warmup=False) * B.shape[0] / k
        sampled &= k == B.shape[0]
        outs = loop()
        B_new = torch.stack([b for b, _ in outs])
        A_new = torch.stack([a for _, a in outs])
        e = errors(B[:k], A[:k], B_new, A_new)
        rel, orth = max(rel, e[0]), max(orth, e[1])
    return total, rel, orth, not sampled


def bandwidth_floor(nbytes: int, device: torch.device) -> tuple[float, float]:
    """(seconds to copy `nbytes` once, copy bandwidth in GB/s) from a warm 256 MB copy_."""
    src = torch.ones(64 << 20, device=device)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), device, 5)
    return t * nbytes / (src.numel() * 4), src.numel() * 4 / t / 1e9


def run_layout(name, args, device, largest):
    spec = LAYOUTS[name]
    groups = make_layout(spec, device, args.a_init)
    nbytes = sum((B.numel() + A.numel()) * B.element_size() for B, A in groups)
    floor, gbps = bandwidth_floor(nbytes, device)
    pairs = sum(L for L, *_ in spec)
    print(f"\n== {name}: {pairs} pairs {[s[1:] for s in spec]} (m, r, n), A {args.a_init}, "
          f"{nbytes / 1e6:.0f} MB of factors; copy {gbps:.1f} GB/s, floor {floor * 1e3:.2f} ms")
    rows = []
    elems = max(m * n for _, m, _, n in spec)
    if elems <= args.dense_max_elems:
        t, rel, orth, extra = time_loop("dense", groups, device, args.dense_sample, 1)
        note = "extrapolated from a sample" if extra else ""
        if largest[0] is None or elems > largest[0][0]:
            largest[0] = (elems, t, spec)
    else:  # model it: SVD cost ∝ m n min(m, n), from the largest layout actually timed
        if largest[0] is None:  # nothing timed yet: time RoBERTa's shape as the reference
            ref_spec = LAYOUTS["roberta"]
            t_ref = time_loop("dense", make_layout(ref_spec, device, args.a_init), device,
                              args.dense_sample, 1)[0]
            largest[0] = (0, t_ref, ref_spec)
        _, ref_t, ref_spec = largest[0]
        cost = lambda sp: sum(L * m * n * min(m, n) for L, m, _, n in sp)  # noqa: E731
        t, rel, orth = ref_t * cost(spec) / cost(ref_spec), float("nan"), float("nan")
        note = "NOT RUN: extrapolated by m·n·min(m,n) from the largest timed layout"
    rows.append(("dense svd loop", t, rel, orth, note))
    t, rel, orth, extra = time_loop("lowrank", groups, device, args.lowrank_sample, 1)
    rows.append(("svd_lowrank loop", t, rel, orth, "extrapolated from a sample" if extra else ""))
    named = {f"{i}.{j}": (B[j], A[j]) for i, (B, A) in enumerate(groups)
             for j in range(B.shape[0])}
    t = best_time(lambda: refactorize_pairs(named), device, args.repeat)
    out = refactorize_pairs(named)
    errs = [errors(B, A, torch.stack([out[f"{i}.{j}"][0] for j in range(B.shape[0])]),
                   torch.stack([out[f"{i}.{j}"][1] for j in range(B.shape[0])]))
            for i, (B, A) in enumerate(groups)]
    rows.append(("ours refactorize_pairs", t, max(e[0] for e in errs), max(e[1] for e in errs),
                 "dict in, dict out (stacking included)"))
    t = best_time(lambda: [refactorize(B, A) for B, A in groups], device, args.repeat)
    errs = [errors(B, A, *refactorize(B, A)) for B, A in groups]
    rows.append(("ours refactorize", t, max(e[0] for e in errs), max(e[1] for e in errs),
                 "pre-stacked, new outputs"))
    work = [(B.clone(), A.clone()) for B, A in groups]

    def restore():  # in place overwrites the inputs: time each run on the original factors
        for (B, A), (B_w, A_w) in zip(groups, work, strict=True):
            B_w.copy_(B)
            A_w.copy_(A)

    t = best_time(lambda: [refactorize(B, A, out=(B, A)) for B, A in work], device, args.repeat,
                  setup=restore)
    errs = [errors(B, A, B_w, A_w) for (B, A), (B_w, A_w) in zip(groups, work, strict=True)]
    rows.append(("ours refactorize in place", t, max(e[0] for e in errs),
                 max(e[1] for e in errs), "pre-stacked, out=(B, A)"))
    base = rows[0][1]
    print(f"{'method':27s} {'time':>10s} {'x floor':>8s} {'vs dense':>9s} {'rel err':>9s} "
          f"{'|AA^T-I|':>9s}  note")
    for label, t, rel, orth, note in rows:
        print(f"{label:27s} {t * 1e3:8.1f}ms {t / floor:8.1f} {base / t:8.0f}x {rel:9.1e} "
              f"{orth:9.1e}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", default="minilm,roberta,llama")
    parser.add_argument("--a-init", choices=["orthonormal", "kaiming", "ill-conditioned"],
                        default="orthonormal", help="A as after a FedSVD round (orthonormal), "
                        "at round 0 (Kaiming), or with κ(A) = 1e4 (Householder fallback)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (best is kept)")
    parser.add_argument("--dense-sample", type=int, default=2,
                        help="layers per shape group timed with dense SVD (0: all)")
    parser.add_argument("--lowrank-sample", type=int, default=4,
                        help="layers per shape group timed with svd_lowrank (0: all)")
    parser.add_argument("--dense-max-elems", type=int, default=2**21,
                        help="largest m·n for which dense SVD is actually run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a busy host")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = f", load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}{load}")
    largest = [None]
    for name in args.layouts.split(","):
        run_layout(name.strip(), args, device, largest)


if __name__ == "__main__":
    main()
