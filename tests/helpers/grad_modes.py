"""The caller's grad modes repfuse must not depend on, and what it must leave as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

MODES = {"enable_grad": torch.enable_grad, "no_grad": torch.no_grad,
         "inference_mode": torch.inference_mode}


@contextlib.contextmanager
def grad_mode(name: str) -> Iterator[None]:
    """Run the body in the grad mode ``name``; assert that the body leaves that mode as
    it was and that the caller's mode is back afterwards."""
    outer = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    with MODES[name]():
        inner = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        yield
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == inner
    assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == outer


def model_state(model: nn.Module) -> dict:
    """Everything of a model the API must leave alone: tensors, requires_grad flags,
    ``.grad`` fields, training flags and every module's attributes (nothing cached on it)."""
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "attributes": {n: sorted(vars(m)) for n, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone()
                      for n, p in model.named_parameters()},
            "training": {n: m.training for n, m in model.named_modules()}}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model_state(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["attributes"] == before["attributes"]
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    for k, g in before["grads"].items():
        a = after["grads"][k]
        assert (a is None) == (g is None) and (g is None or torch.equal(a, g)), k


def verdict(result) -> tuple:
    """What must not depend on the grad mode: every region's outcome and every check's."""
    report = result.report
    return (report.ok, [(r.path, str(r.status)) for r in report.regions],
            [(r.path, [(c.name, c.ok) for c in r.proofs.checks]) for r in report.fused],
            [(c.name, c.ok) for c in report.model_checks.checks])


def fuse_in(mode: str, fuse, model: nn.Module, *args, **kwargs):
    """``fuse(model, *args, **kwargs)`` in grad mode ``mode``: the model comes back as it
    was, and the fused model's parameters are ordinary tensors (it can be trained)."""
    before = model_state(model)
    with grad_mode(mode):
        result = fuse(model, *args, **kwargs)
    assert_same_state(model, before)
    assert not any(p.is_inference() for p in result.model.parameters())
    return result
