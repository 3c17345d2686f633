"""Reach: models written the way real repositories write them fuse completely through
``repfuse.fuse``: untraceable parents, routing by attributes, list mutation, norm variants,
kernels computed in forward, padding by slice assignment, cropping by slicing.

For each idiom (``reach_idioms``): the report is ok, the fused model runs exactly the
authors' number of convolutions and no normalization, computes the same outputs, keeps
the class and plain attributes of every module it still has, and runs in its parents' own
forward code."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers.reach_idioms import IDIOMS
from torch import nn
from torch.overrides import TorchFunctionMode

import repfuse

_PLAIN = ("f", "i", "type", "save")


class _CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.convs = 0
        self.norms = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.convs += name in ("conv2d", "_conv_forward")
        self.norms += "norm" in name
        return func(*args, **(kwargs or {}))


def executed(model: nn.Module, x) -> tuple[int, int]:
    """(convolutions, normalizations) run by one forward pass."""
    with torch.no_grad(), _CountOps() as ops:
        model(x)
    return ops.convs, ops.norms


def norm_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" in type(m).__name__]


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors(v)]
    return []


def assert_same(out, ref) -> None:
    got, want = tensors(out), tensors(ref)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()) + 1e-6)


def assert_identity(fused: nn.Module, model: nn.Module) -> None:
    """Every module path of the input that the fused model still has keeps its class
    (isinstance) and its plain attributes; parents never rewritten keep their code."""
    kept = dict(fused.named_modules())
    for path, m in model.named_modules():
        if path not in kept:
            continue
        assert isinstance(kept[path], type(m)), (path, type(kept[path]), type(m))
        for attr in _PLAIN:
            if attr in vars(m):
                assert getattr(kept[path], attr) == getattr(m, attr), (path, attr)


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_fuses_completely(name):
    model, x, convs = IDIOMS[name]()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x.clone())
    result = repfuse.fuse(model, x)
    report = result.report
    assert report.ok, report.to_dict()
    fused = result.model
    assert executed(fused, x.clone()) == (convs, 0)
    assert norm_modules(fused) == []
    with torch.no_grad():
        assert_same(fused(x.clone()), ref)
    assert_identity(fused, model)
    assert type(fused) is type(model)
    for k, v in model.state_dict().items():   # the input model is untouched
        assert torch.equal(v, before[k]), k


def test_untraceable_parents_keep_their_forward():
    model, x, _ = IDIOMS["routed"]()
    fused = repfuse.fuse(model, x, verify=False).model
    assert type(fused).forward is type(model).forward
    assert "forward" not in vars(fused)
    head = fused.model[7]
    assert type(head).forward is type(model.model[7]).forward
    assert [m.f for m in fused.model] == [m.f for m in model.model]


@pytest.mark.parametrize("name", ["routed", "diverse_bn_and_pad", "masked_edges"])
def test_fused_models_copy_and_pickle(name):
    model, x, _ = IDIOMS[name]()
    fused = repfuse.fuse(model, x, verify=False).model
    with torch.no_grad():
        ref = fused(x.clone())
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (copy.deepcopy(fused), loaded):
        with torch.no_grad():
            assert_same(other(x.clone()), ref)
        assert_identity(other, fused)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_idiom_same_through_export_and_fuse_onnx(name, tmp_path):
    """The ONNX route on the same model (the exporter flattens the Python): both routes
    verify and give the same outputs, and the torch route reaches at least as far (slice
    assignments export as ScatterND, which the ONNX front end does not read as a pad)."""
    import onnx
    from helpers.onnx_graphs import ort_run

    model, x, convs = IDIOMS[name]()
    fx = repfuse.fuse(model, x)
    path = tmp_path / f"{name}.onnx"
    assert repfuse.export_onnx(model, x, path, dynamic_batch=False).ok
    result = repfuse.fuse_onnx(onnx.load(str(path)))
    assert fx.report.ok and result.report.ok, result.report.to_dict()
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") >= convs == executed(fx.model, x.clone())[0]
    with torch.no_grad():
        ref = fx.model(x.clone())
    first = ref[0] if isinstance(ref, (tuple, list)) else ref   # ort_run: the first output
    torch.testing.assert_close(torch.as_tensor(ort_run(result.model, x.numpy())),
                               first.detach(), rtol=1e-4, atol=1e-4)
