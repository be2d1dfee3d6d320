"""A new A as an r × r map of the old one, computed to the same bits on every machine.

After a FedSVD round the new A' = Vᵀ[:r] spans a subspace of the rows of A_prev (M = B̄ A_prev),
so A' = T A_prev for one r × r matrix T per layer: a client that holds A_prev needs only T
(r² numbers) instead of A' (r · n). For the server and every client to hold the same A' bit for
bit, A' is *defined* as :func:`rotate_rows` (T, A_prev), a product computed with elementwise
IEEE operations in a fixed order (no BLAS, whose summation order depends on the library, the
threads and the device).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def rotate_rows(T: Tensor, A: Tensor) -> Tensor:
    """A' = T A for stacks T (L, r, r) and A (L, r, n), the same bits on every device.

    A'[:, i, :] = Σ_k T[:, i, k] · A[:, k, :], accumulated in float64 for k = 0, …, r − 1 with
    one elementwise multiply and one add per term (never fused), then rounded to float32. Every
    step is a correctly rounded IEEE operation on each element, so CPUs and GPUs, and any number
    of threads, give identical results for identical inputs.

    Returns
    -------
    (L, r, n) float32 tensor on A's device.
    """
    if T.ndim != 3 or A.ndim != 3 or T.shape[0] != A.shape[0] or T.shape[1] != T.shape[2] \
            or T.shape[2] != A.shape[1]:
        raise ValueError(f"expected T (L, r, r) and A (L, r, n), got {tuple(T.shape)} and "
                         f"{tuple(A.shape)}")
    T64, A64 = T.to(device=A.device, dtype=torch.float64), A.to(torch.float64)
    out = torch.zeros(A.shape, dtype=torch.float64, device=A.device)  # (L, r, n)
    for k in range(A.shape[1]):
        term = T64[:, :, k, None] * A64[:, None, k, :]  # (L, r, n): T[:, i, k] A[:, k, :]
        out.add_(term)
    return out.to(torch.float32)


@torch.no_grad()
def rotation_between(A_new: Tensor, A_prev: Tensor) -> tuple[Tensor, Tensor]:
    """T minimising ‖T A_prev − A_new‖_F per layer, as float32, and its relative residual.

    T = A_new A_prevᵀ (A_prev A_prevᵀ)⁻¹ (float64; A_prev (L, r, n) of full row rank, as LoRA's A
    always is; a pseudo-inverse otherwise). The residual of layer l is
    ‖rotate_rows(T, A_prev) − A_new‖_F / ‖A_new‖_F: about 1e-7 when A_new lies in the row space
    of A_prev (FedSVD), of order 1 when it does not (a fresh or averaged A).

    Returns
    -------
    T : (L, r, r) float32; residual : (L,) float64.
    """
    prev, new = A_prev.to(torch.float64), A_new.to(torch.float64)
    gram = prev @ prev.transpose(1, 2)  # (L, r, r)
    cross = new @ prev.transpose(1, 2)  # (L, r, r)
    T = torch.linalg.lstsq(gram.transpose(1, 2), cross.transpose(1, 2)).solution.transpose(1, 2)
    T32 = T.to(torch.float32)
    rebuilt = rotate_rows(T32, A_prev).to(torch.float64)
    scale = torch.linalg.matrix_norm(new).clamp_min(torch.finfo(torch.float64).tiny)
    return T32, torch.linalg.matrix_norm(rebuilt - new) / scale
