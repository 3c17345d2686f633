"""AffineConv: from/to nn.Conv2d, evaluation, dtype casts."""

import pytest
import torch
import torch.nn as nn
from helpers.algebra import TOL, D, conv_ref, max_diff, rand_conv
from hypothesis import given
from hypothesis import strategies as st

from repfuse.algebra import AffineConv
from repfuse.core.spec import ConvSpec
from repfuse.errors import NotFusable


@given(k=st.tuples(st.integers(1, 4), st.integers(1, 4)), s=st.integers(1, 2),
       p=st.integers(0, 2), d=st.integers(1, 2), g=st.sampled_from([1, 2, 4]),
       bias=st.booleans(), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       seed=st.integers(0, 2**16))
def test_from_conv_to_module_roundtrip(k, s, p, d, g, bias, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    conv = rand_conv(4, 8, k, gen, stride=s, padding=p, dilation=d, groups=g, bias=bias,
                     padding_mode=mode)
    x = torch.randn(2, 4, 7, 8, generator=gen, dtype=D)
    ac = AffineConv.from_conv(conv)
    assert ac.weight.dtype == D and ac.bias.shape == (8,) and ac.dtype == D
    assert ac.padding_mode == mode
    ref = conv(x)
    assert max_diff(ac.forward(x), ref) < TOL
    module = ac.to_module()
    assert isinstance(module, nn.Conv2d) and module.bias is not None
    assert module.padding_mode == mode and module.weight.dtype == D
    assert max_diff(module(x), ref) < TOL


@given(pads=st.tuples(*[st.integers(0, 2)] * 4),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       seed=st.integers(0, 2**16))
def test_asymmetric_padding_module(pads, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    spec = ConvSpec(3, 5, (2, 3), 1, pads, 1, 1, mode)
    w = torch.randn(spec.weight_shape, generator=gen, dtype=D)
    b = torch.randn(5, generator=gen, dtype=D)
    ac = AffineConv.from_tensors(w, b, spec)
    x = torch.randn(1, 3, 6, 7, generator=gen, dtype=D)
    ref = conv_ref(x, w, b, 1, pads, 1, 1, mode)
    module = ac.to_module()
    if spec.is_symmetric_padding:
        assert isinstance(module, nn.Conv2d)
    else:
        assert isinstance(module, nn.Sequential) and isinstance(module[1], nn.Conv2d)
    assert max_diff(module(x), ref) < TOL
    assert max_diff(ac.forward(x), ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cast_back_and_cast_error(dtype):
    gen = torch.Generator().manual_seed(0)
    conv = rand_conv(4, 4, 3, gen, padding=1).to(dtype)
    ac = AffineConv.from_conv(conv)
    assert ac.dtype == dtype and ac.weight.dtype == D
    module = ac.to_module()
    assert module.weight.dtype == dtype and module.weight.device == conv.weight.device
    # the source values are representable in dtype: no rounding error
    assert ac.cast_error() == 0.0
    scaled = ac.replace(weight=ac.weight / 3.0)
    expected = (scaled.weight.to(dtype).double() - scaled.weight).abs().max().item()
    assert scaled.cast_error() == pytest.approx(max(expected, 0.0))
    assert 0 < scaled.cast_error() <= torch.finfo(dtype).eps * scaled.weight.abs().max()


def test_conv_without_bias_gets_zero_bias_and_transposed_layout():
    conv = nn.Conv2d(2, 3, 3, bias=False)
    ac = AffineConv.from_conv(conv)
    assert torch.equal(ac.bias, torch.zeros(3, dtype=D))
    assert ac.to_module().bias is not None
    # a transposed conv holds torch's (I, O/g, KH, KW) weight and becomes a ConvTranspose2d
    t = AffineConv(torch.zeros(2, 3, 3, 3, dtype=D), torch.zeros(3, dtype=D),
                   ConvSpec(2, 3, 3, transposed=True))
    assert isinstance(t.to_module(), nn.ConvTranspose2d) and t.describe() == "deconv3x3"
    with pytest.raises(ValueError, match="shape"):
        AffineConv(torch.zeros(3, 2, 3, 3, dtype=D), torch.zeros(3, dtype=D),
                   ConvSpec(2, 3, 3, transposed=True))
    with pytest.raises(NotFusable, match="nn.Conv2d"):
        AffineConv.from_conv(nn.ConvTranspose2d(2, 3, 3))


def test_from_conv_is_differentiable():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    ac = AffineConv.from_conv(conv)
    (ac.weight.sum() + 2 * ac.bias.sum()).backward()
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))
    assert torch.equal(conv.bias.grad, 2 * torch.ones_like(conv.bias))


def test_modules_own_their_tensors():
    """to_module never aliases the source parameters or another module's."""
    conv = rand_conv(2, 3, 3, torch.Generator().manual_seed(0), padding=1)  # float64
    ac = AffineConv.from_conv(conv)
    m1, m2 = ac.to_module(), ac.to_module()
    with torch.no_grad():
        m1.weight.add_(1.0)
        m1.bias.add_(1.0)
    assert torch.equal(m2.weight, conv.weight) and torch.equal(m2.bias, conv.bias)
    assert torch.equal(ac.weight, conv.weight.detach())
    assert ac.cast_error() == 0.0
    half = ac.replace(dtype=torch.float16)
    err = half.cast_error()
    m3 = half.to_module()
    with torch.no_grad():
        m3.weight.zero_()
    assert half.cast_error() == err > 0


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_cast_error_and_module_of_a_channels_last_kernel(fmt):
    """A float64 kernel in either memory format: the cast error is the largest difference
    element by element, and the module's weight is contiguous with the cast values."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) / 3
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    spec = ConvSpec(4, 6, (3, 3), padding=(1, 1, 1, 1))
    ac = AffineConv(w.contiguous(memory_format=fmt), b, spec)
    want = max(float((w - w.float().double()).abs().max()),
               float((b - b.float().double()).abs().max()))
    assert ac.cast_error() == want > 0
    module = ac.to_module()
    assert module.weight.is_contiguous()
    assert torch.equal(module.weight, w.float()) and torch.equal(module.bias, b.float())


@given(o=st.integers(1, 9), i=st.integers(1, 5), k=st.integers(1, 3),
       order=st.permutations(range(4)), block=st.integers(1, 64),
       own_order=st.integers(1, 200),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_cast_in_blocks_is_the_cast_and_its_exact_error(o, i, k, order, block, own_order,
                                                         dtype, seed):
    """The cast is made in blocks (any size, any memory order of the float64 kernel: of
    the first axis, or of the memory-order views): the module's tensors are the cast
    values, contiguous, and the cast error is the largest difference element by element,
    wherever it lies."""
    import repfuse.algebra.affine as affine

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(o, i, k, k, generator=gen, dtype=torch.float64) / 3
    b = torch.randn(o, generator=gen, dtype=torch.float64) / 7
    stored = w.permute(order).contiguous().permute([order.index(d) for d in range(4)])
    assert torch.equal(stored, w)
    ac = AffineConv(stored, b, ConvSpec(i, o, (k, k)), dtype=dtype)
    want = max(float((w - w.to(dtype).double()).abs().max()),
               float((b - b.to(dtype).double()).abs().max()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(affine, "_BLOCK", block)
        patch.setattr(affine, "_OWN_ORDER", own_order)
        assert ac.cast_error() == want
        module = ac.to_module()
    assert module.weight.is_contiguous() and module.weight.dtype == dtype
    assert torch.equal(module.weight, w.to(dtype)) and torch.equal(module.bias, b.to(dtype))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bad", [float("nan"), 1e300])
def test_cast_error_reports_nan_and_overflow(bad, fmt):
    """A NaN value makes the cast error NaN, a value beyond float32 infinite: neither is
    lost in the maximum over the blocks (of either memory order)."""
    w = torch.ones(3, 2, 3, 3, dtype=torch.float64) / 3
    w[2, 1, 2, 0] = bad
    w = w.contiguous(memory_format=fmt)
    import repfuse.algebra.affine as affine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(affine, "_BLOCK", 7)
        patch.setattr(affine, "_OWN_ORDER", 1)
        ac = AffineConv(w, torch.zeros(3, dtype=torch.float64), ConvSpec(2, 3, (3, 3)))
        err = ac.cast_error()
        assert (err != err) if bad != bad else err == float("inf")
    ac = AffineConv(w, torch.zeros(3, dtype=torch.float64), ConvSpec(2, 3, (3, 3)))
    err = ac.cast_error()
    assert (err != err) if bad != bad else err == float("inf")


@pytest.mark.parametrize("layout, transposed, cls", [
    ("NCHW", False, nn.Conv2d), ("NCHW", True, nn.ConvTranspose2d),
    ("NCL", False, nn.Conv1d), ("NC", False, nn.Linear)])
def test_modules_are_plain_torch_layers(layout, transposed, cls):
    """The layers ``to_module`` builds (without drawing initial values) are of the torch
    class itself: they pickle, copy and re-initialise as any such layer, and hold the
    kernel's values."""
    import copy
    import io

    gen = torch.Generator().manual_seed(5)
    k = (1, 1) if layout == "NC" else (1, 3) if layout == "NCL" else (3, 3)
    shape = (4, 6, *k) if transposed else (6, 4, *k)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    padding = (0, 0, 1, 1) if layout == "NCL" else (0, 0, 0, 0) if layout == "NC" else 1
    spec = ConvSpec(4, 6, k, padding=padding, transposed=transposed)
    module = AffineConv(w, b, spec, value_layout=layout).to_module()
    assert type(module) is cls
    view = w[:, :, 0, 0] if layout == "NC" else w[:, :, 0] if layout == "NCL" else w
    assert torch.equal(module.weight, view.float()) and torch.equal(module.bias, b.float())
    for other in (copy.deepcopy(module), _pickled(module, io)):
        assert type(other) is cls and torch.equal(other.weight, module.weight)
    before = module.weight.detach().clone()
    module.reset_parameters()     # the class's own initialisation
    assert not torch.equal(module.weight, before)


def _pickled(module, io):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_modules_draw_no_initial_values(monkeypatch):
    """``to_module`` does not run the layer's random initialisation (its values are
    replaced at once)."""
    calls = []
    monkeypatch.setattr(nn.Conv2d, "reset_parameters", lambda self: calls.append(self))
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    module = AffineConv(w, torch.zeros(6, dtype=torch.float64),
                        ConvSpec(4, 6, (3, 3), padding=1)).to_module()
    assert type(module) is nn.Conv2d and not calls
    assert torch.equal(module.weight, w.float())
