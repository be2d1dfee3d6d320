"""DP-SGD set-up for one round of local training, with the ledger carried across rounds."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from privacy import grad_samplers  # noqa: F401  (registers SingularValueLinear with Opacus)
from privacy.accounting import PrivacyLedger
from privacy.grouped_clipping import ClipGroup, GroupedClipDPOptimizer


@contextlib.contextmanager
def frozen_input_backward() -> Iterator[None]:
    """Opacus' "Full backward hook is firing ..." UserWarning off for the block.

    Expected when no input needs a gradient (only the adapter and the head do): the hooks then
    fire on module outputs, which is what they need. Not a problem, but it would be repeated
    on every step of every client. The warning filters are restored after the block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        yield


@dataclass
class PrivateTraining:
    """What the local training loop needs: module, optimizer, Poisson loader, criterion."""

    module: nn.Module
    optimizer: Optimizer
    data_loader: DataLoader
    criterion: nn.Module
    engine: PrivacyEngine | None

    def record_into(self, ledger: PrivacyLedger) -> None:
        """Copy the steps taken in this round (the engine's accountant) back into ``ledger``."""
        if self.engine is not None:
            ledger.history = list(self.engine.accountant.history)


def empty_batch_step(optimizer: Optimizer) -> None:
    """The DP-SGD step of an empty Poisson batch, taken without running the model on it.

    With no example the sum of clipped per-example gradients is 0, so the update is the noise
    alone, p.grad = N(0, σ²C² I) / B (B the expected batch), exactly what Opacus computes for an
    empty batch; the step is taken and accounted like any other (Poisson sampling's guarantee
    counts the empty draws too). Only the forward pass is skipped: some models cannot run on 0
    examples (Llama's attention reshapes with -1). Hooks and grouped clipping read each
    parameter's per-sample gradients, (0, *shape) here; ghost clipping reads p.grad, zeros.
    Without DP (a plain optimizer) an empty batch moves nothing, so nothing is done.
    """
    if isinstance(optimizer, DPOptimizerFastGradientClipping):
        for p in optimizer.params:
            p.grad = torch.zeros_like(p)
    elif isinstance(optimizer, DPOptimizer):
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    else:
        return
    optimizer.step()


def make_private(
    *,
    module: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: PrivacyLedger,
    grad_sample_mode: str = "hooks",
    clip_groups: Sequence[ClipGroup] | None = None,
    criterion: nn.Module | None = None,
) -> PrivateTraining:
    """Wrap for DP-SGD: Poisson sampling, per-sample clipping to C, Gaussian noise σ·C.

    With ``clip_groups`` each group of parameters is clipped to its own norm C_g and the noise
    is σ · √(Σ C_g²) (:mod:`privacy.grouped_clipping`; hooks mode only); ``max_grad_norm`` is
    then unused.

    The optimizer must already hold only the trainable parameters (the LoRA factors not trained
    this round frozen before this call), so per-sample gradients are computed for those alone.
    The engine's accountant starts from ``ledger``'s history, so its ε after this round is
    cumulative. With ``noise_multiplier = 0`` (ε = inf) the same loop runs with Poisson batches
    but no clipping, no noise, no accounting. ``criterion`` is the loss of a batch, the mean
    over its examples (default: cross-entropy of class logits; a causal LM's is
    :class:`common.tasks.SequenceCrossEntropy`, one sequence one example).
    """
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    if noise_multiplier == 0:
        loader = DPDataLoader.from_data_loader(data_loader)
        return PrivateTraining(module, optimizer, loader, criterion, engine=None)
    with warnings.catch_warnings():  # the "Secure RNG turned off" notice, once per round
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    wrapped = engine.make_private(
        module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":  # ghost clipping needs the criterion it returns
        module, optimizer, criterion, loader = wrapped
    else:
        module, optimizer, loader = wrapped
    if clip_groups:
        if grad_sample_mode != "hooks":
            raise ValueError(f"grouped clipping needs grad_sample_mode='hooks', not "
                             f"{grad_sample_mode!r}")
        optimizer = GroupedClipDPOptimizer(
            optimizer.original_optimizer, noise_multiplier=noise_multiplier, groups=clip_groups,
            expected_batch_size=optimizer.expected_batch_size,
            loss_reduction=optimizer.loss_reduction)
        optimizer.attach_step_hook(  # as PrivacyEngine.make_private does for its optimizer
            engine.accountant.get_optimizer_hook_fn(sample_rate=1 / len(data_loader)))
    return PrivateTraining(module, optimizer, loader, criterion, engine)
