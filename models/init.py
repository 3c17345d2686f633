"""Seeded random weights with realistic batch-norm statistics.

Freshly built models have batch norms with weight 1, bias 0, running mean 0 and
running variance 1: a fusion bug in the handling of any of them goes unnoticed. Here
every batch norm gets random affine parameters, and running statistics measured on a
random batch (so activations stay O(1) through deep networks, as in a trained model)
and then perturbed, so that eval mode differs from train mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from repfuse.models.layers import IdentityBasedConv1x1

CALIBRATION_SHAPE = (8, 3, 64, 64)


def init_model(build: Callable[[], nn.Module], *, seed: int | None = None,
               realistic_bn: bool = True,
               calibration_shape: tuple[int, ...] = CALIBRATION_SHAPE) -> nn.Module:
    """Call ``build()`` (under ``seed`` if given, leaving torch's global random state as it
    was), optionally give it realistic batch-norm statistics, and return it in eval mode."""
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        model = build()
        if realistic_bn:
            randomize_batchnorms(model, calibration_shape)
    return model.eval()


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomize_batchnorms(model: nn.Module,
                         calibration_shape: tuple[int, ...] = CALIBRATION_SHAPE) -> None:
    """Random affine parameters, running statistics from one random batch, perturbed.

    Zero-initialised identity-based 1x1 kernels also get small random values. Uses the
    global random generator (seed it, or call through ``init_model``)."""
    for m in model.modules():
        if isinstance(m, IdentityBasedConv1x1):
            m.weight.normal_(0.0, 0.1)
    bns = _batchnorms(model)
    for bn in bns:
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    batch = torch.randn(calibration_shape)      # drawn in float32 whatever the model's dtype
    if ref is not None:
        batch = batch.to(ref.device, ref.dtype)
    calibrate_batchnorms(model, batch)
    for bn in bns:
        # channels dead on the calibration batch would get variance 0: floor it
        bn.running_var.clamp_(min=0.1 * float(bn.running_var.median()) + 1e-3)
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.1 * std * torch.randn_like(std))
        bn.running_var.mul_(torch.empty_like(std).uniform_(0.8, 1.25))


@torch.no_grad()
def calibrate_batchnorms(model: nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of the batch ``x`` (one
    train-mode forward pass with a cumulative average); restore the model's modes.

    A model that runs only in eval mode (a detection head that decodes boxes at inference,
    say) is calibrated with its batch norms alone in training mode."""
    bns = _batchnorms(model)
    momenta = [bn.momentum for bn in bns]
    modes = [(m, m.training) for m in model.modules()]
    try:
        try:
            _forward_with_batch_statistics(model, bns, x, everything=True)
        except Exception:  # noqa: BLE001 - then with the batch norms alone in training mode
            _forward_with_batch_statistics(model, bns, x, everything=False)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, training in modes:
            m.training = training


def _forward_with_batch_statistics(model: nn.Module, bns: list, x: torch.Tensor, *,
                                   everything: bool) -> None:
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train(everything)
    for bn in bns:
        bn.train()
    model(x)
