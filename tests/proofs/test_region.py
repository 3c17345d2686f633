"""Per-region proofs (repfuse.proofs.region.prove_region): correct fusions pass on a zoo of
block designs, planted faults are caught, nothing of the model is modified."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse import region as rg
from repfuse.core.spec import ConvSpec
from repfuse.proofs import prove_region as prove_region_reexport
from repfuse.proofs.region import probe_shape, prove_region, worst

F64 = torch.float64


# ------------------------------------------------------------------ region builders
class Maker:
    """Builds region nodes around real nn modules (float32 parameters, as in a model)."""

    def __init__(self, seed=0, dtype=torch.float32):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.modules = []

    def rand(self, *shape, lo=-1.0, hi=1.0):
        return torch.rand(*shape, generator=self.gen, dtype=F64) * (hi - lo) + lo

    def conv(self, inp, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=False,
             name=""):
        m = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias).to(self.dtype)
        with torch.no_grad():
            m.weight.copy_(self.rand(*m.weight.shape))
            if bias:
                m.bias.copy_(self.rand(cout))
        self.modules.append(m)
        spec = ConvSpec(cin, cout, k, stride, padding, dilation, groups)
        return rg.Conv(inp, m.weight, m.bias, spec, name or f"conv{len(self.modules)}")

    def bn(self, inp, c, name=""):
        m = nn.BatchNorm2d(c).to(self.dtype).eval()
        with torch.no_grad():
            m.running_mean.copy_(self.rand(c))
            m.running_var.copy_(self.rand(c, lo=0.5, hi=2.0))
            m.weight.copy_(self.rand(c, lo=0.5, hi=1.5))
            m.bias.copy_(self.rand(c))
        self.modules.append(m)
        return rg.BatchNorm(inp, m.running_mean, m.running_var, m.weight, m.bias, m.eps,
                            name or f"bn{len(self.modules)}")

    def convbn(self, inp, cin, cout, k, **kw):
        return self.bn(self.conv(inp, cin, cout, k, **kw), cout)

    def param(self, *shape):
        p = nn.Parameter(self.rand(*shape).to(self.dtype))
        self.modules.append(p)
        return p


def repvgg(c=4, stride=1, groups=1, seed=0):
    m = Maker(seed)
    x = rg.Input(c)
    branches = [m.convbn(x, c, c, 3, stride=stride, padding=1, groups=groups),
                m.convbn(x, c, c, 1, stride=stride, groups=groups)]
    if stride == 1:
        branches.append(m.bn(x, c))
    return rg.Add(tuple(branches))


def acnet(c=4, seed=1):
    m = Maker(seed)
    x = rg.Input(c)
    return rg.Add((m.convbn(x, c, c, 3, padding=1), m.convbn(x, c, c, (1, 3), padding=(0, 1)),
                   m.convbn(x, c, c, (3, 1), padding=(1, 0))))


def dbb(c=4, seed=2):
    """Diverse Branch Block: kxk, 1x1, 1x1 -> BN-and-pad -> kxk, 1x1 -> avgpool."""
    m = Maker(seed)
    x = rg.Input(c)
    seq = m.bn(m.conv(x, c, c, 1), c)
    seq = rg.Pad(seq, (1, 1, 1, 1), zero_response=True)
    seq = m.convbn(seq, c, c, 3)
    avg = rg.Pad(m.bn(m.conv(x, c, c, 1), c), (1, 1, 1, 1), zero_response=True)
    avg = m.bn(rg.AvgPool(avg, (3, 3), (1, 1), 0), c)
    return rg.Add((m.convbn(x, c, c, 3, padding=1), m.convbn(x, c, c, 1), seq, avg))


def mobileone_dw(c=6, k=3, seed=3):
    m = Maker(seed)
    x = rg.Input(c)
    branches = [m.convbn(x, c, c, 3, padding=1, groups=c) for _ in range(k)]
    branches += [m.convbn(x, c, c, 1, groups=c), m.bn(x, c)]
    return rg.Add(tuple(branches))


def mobileone_pw(c=4, o=4, k=3, seed=4):
    m = Maker(seed)
    x = rg.Input(c)
    branches = [m.convbn(x, c, o, 1) for _ in range(k)] + [m.bn(x, c)]
    return rg.Add(tuple(branches))


def replk(c=4, seed=5):
    m = Maker(seed)
    x = rg.Input(c)
    return rg.Add((m.convbn(x, c, c, 7, padding=3, groups=c),
                   m.convbn(x, c, c, 3, padding=1, groups=c),
                   m.convbn(x, c, c, 3, padding=3, dilation=3, groups=c)))


def repmixer(c=4, seed=6):
    """x + layer_scale * (BN(dwconv(x)) - BN(x)) with a learnable per-channel scale."""
    m = Maker(seed)
    x = rg.Input(c)
    diff = rg.Sub(m.convbn(x, c, c, 3, padding=1, groups=c), m.bn(x, c))
    return rg.Add((x, rg.Scale(diff, m.param(c), "layer_scale")))


def mixed_concat(c=4, seed=7):
    m = Maker(seed)
    x = rg.Input(c)
    a = rg.Add((m.convbn(x, c, 3, 5, padding=2), m.convbn(x, c, 3, 3, padding=1),
                m.conv(x, c, 3, 1, bias=True)))
    b = rg.Scale(m.convbn(x, c, 2, 3, padding=1), 0.5)
    return rg.Concat((a, rg.Neg(b)))


def asym_stride2(c=3, seed=8):
    """Stride 2 with asymmetric padding: 3x3 (1,1,1,1) + 1x1 read at the same grid."""
    m = Maker(seed)
    x = rg.Input(c)
    return rg.Add((m.convbn(x, c, 5, 3, stride=2, padding=1),
                   m.convbn(x, c, 5, 1, stride=2, padding=0),
                   m.conv(x, c, 5, (2, 2), stride=2, padding=(1, 0, 1, 0), bias=True)))


ZOO = {"repvgg": repvgg, "repvgg_s2_g2": lambda: repvgg(4, 2, 2), "acnet": acnet, "dbb": dbb,
       "mobileone_dw": mobileone_dw, "mobileone_pw": mobileone_pw, "replk": replk,
       "repmixer": repmixer, "mixed_concat": mixed_concat, "asym_stride2": asym_stride2}


def _activation(expr, seed=11):
    c = [n for n in _nodes(expr) if isinstance(n, rg.Input)][0].channels
    return torch.randn(2, c, 40, 33, generator=torch.Generator().manual_seed(seed))


def _nodes(expr):
    from repfuse.region.tree import walk as nodes

    return nodes(expr)


# ------------------------------------------------------------------ zoo passes
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_regions_prove(name):
    expr = ZOO[name]()
    fused = rg.reduce(expr)
    rep = prove_region(expr, fused, _activation(expr), module=True)
    assert rep.ok, [c.to_dict() for c in rep.failures]
    names = {c.name for c in rep.checks}
    assert {"output[random]", "output[activation]", "module output[random]",
            "module output[activation]", "grad input"} <= names
    # every branch parameter gets its weight-gradient check
    for p in rg.parameters(expr):
        assert f"grad {p}" in names
    assert all(c.max_rel < 1e-12 for c in rep.checks if not c.name.startswith("module"))
    assert rep.dtype == "float64"


def test_reexport_and_summary():
    expr = repvgg()
    rep = prove_region_reexport(expr, rg.reduce(expr))
    names = {c.name for c in rep.checks}
    assert rep.ok and "output[activation]" not in names and "module output[random]" not in names
    abs_err, rel_err = worst(rep)
    assert 0 <= abs_err < 1e-12 and 0 <= rel_err < 1e-12


def test_probe_without_a_window_is_twice_the_kernel():
    """No expression (or a transposed conv): twice the fused kernel's extent, plus one on W."""
    spec = ConvSpec(4, 4, 7, stride=2, dilation=2)
    n, c, h, w = probe_shape(spec)
    ek = spec.effective_kernel
    assert (n, c) == (1, 4) and h >= 2 * ek[0] and w >= 2 * ek[1] and h != w


def test_read_window_composes_branches_and_sequences():
    m = Maker(0)
    x = rg.Input(4)
    assert rg.read_window(x) == ((1, 1), (1, 1))
    assert rg.read_window(repvgg()) == ((3, 3), (1, 1))
    assert rg.read_window(acnet()) == ((3, 3), (1, 1))
    assert rg.read_window(replk()) == ((7, 7), (1, 1))      # 7x7 and 3x3 dilated 3
    assert rg.read_window(dbb()) == ((3, 3), (1, 1))        # pads shift, do not widen
    assert rg.read_window(asym_stride2()) == ((3, 3), (2, 2))
    seq = m.conv(m.conv(x, 4, 4, 3, stride=2, padding=1), 4, 4, (1, 5), padding=(0, 2))
    assert rg.read_window(seq) == ((3, 3 + 4 * 2), (2, 2))
    pooled = rg.AvgPool(m.conv(x, 4, 4, 1, stride=2), (3, 3), (2, 2), 1)
    assert rg.read_window(pooled) == ((1 + 2 * 2, 5), (4, 4))
    up = rg.ConvTranspose(x, torch.zeros(4, 4, 2, 2), None, ConvSpec(4, 4, 2, stride=2,
                                                                     transposed=True))
    assert rg.read_window(rg.Add((up, up))) is None


def test_depthwise_probe_is_twice_the_window():
    """Depthwise kernels keep the probe of twice the extent (torch's float64 grouped CPU
    convolution can materialise every channel's windows on the smaller one)."""
    expr = replk()
    fused = rg.reduce(expr)
    assert fused.spec.is_depthwise
    assert probe_shape(fused.spec, "NCHW", expr) == (1, 4, 14, 15)
    dense = repvgg()
    assert probe_shape(rg.reduce(dense).spec, "NCHW", dense) == (1, 4, 4, 5)


def test_probe_sizes_of_rows_and_vectors():
    from repfuse.region import layout as L

    assert L.probe_size("NCL", (1, 3), (1, 1)) == (2, 1, 5)     # a Conv1d k=3: 3 + 1 + 1
    assert L.probe_size("NLC", (1, 1), (1, 1)) == (2, 1, 3)     # tokens
    assert L.probe_size("NCL", (1, 3)) == (2, 1, 7)             # no window: 2e + 1
    assert L.probe_size("NC", (1, 1), (1, 1)) == (6, 1, 1)      # vectors: samples


def _taps_read(size, spec, axis):
    """The tap offsets along ``axis`` that read a real (not padded) input position at
    some output position of ``spec`` on a probe of ``size`` positions."""
    k, s, d = spec.kernel_size[axis], spec.stride[axis], spec.dilation[axis]
    pad = spec.padding[2 * axis]
    out = (size + pad + spec.padding[2 * axis + 1] - d * (k - 1) - 1) // s + 1
    return {i for i in range(k) for o in range(out) if 0 <= o * s - pad + i * d < size}


@given(k=st.integers(1, 9), s=st.integers(1, 4), d=st.integers(1, 3),
       kw=st.integers(1, 9), sw=st.integers(1, 4))
def test_probe_reads_every_tap_and_differs_in_parity(k, s, d, kw, sw):
    """The probe sized from the window: every tap of the kernel reads a real value at some
    output position ('same' padding and no padding), H and W differ in size and parity."""
    for pad in ("same", "none"):
        ph = d * (k - 1) // 2 if pad == "same" else 0
        pw = d * (kw - 1) // 2 if pad == "same" else 0
        spec = ConvSpec(2, 3, (k, kw), stride=(s, sw), padding=(ph, pw), dilation=(d, 1))
        m = Maker(0)
        expr = m.conv(rg.Input(2), 2, 3, (k, kw), stride=(s, sw), padding=(ph, pw),
                      dilation=(d, 1))
        n, c, h, w = probe_shape(spec, "NCHW", expr)
        assert (n, c) == (1, 2) and h != w and (h - w) % 2 == 1
        assert _taps_read(h, spec, 0) == set(range(k))
        assert _taps_read(w, spec, 1) == set(range(kw))
        # no larger than the old probe (twice the extent) where the stride is at most it
        ek = spec.effective_kernel
        if s <= ek[0] and sw <= ek[1]:
            assert h <= 2 * ek[0] + 1 and w <= 2 * ek[1] + 2


def test_a_fused_kernel_narrower_than_the_region_fails_without_raising():
    """A fused 1x1 kernel for a region with a 7x7 branch: the probe is sized from the
    training form's window (8x9), not the fused kernel's (2x3); the outputs differ and the
    weight-gradient check reports the kernel shapes instead of raising."""
    m = Maker(12)
    x = rg.Input(3)
    point = m.conv(x, 3, 3, 1, bias=True)
    expr = rg.Add((m.conv(x, 3, 3, 7, padding=3), point))
    wrong = rg.reduce(point)                # the 1x1 branch alone
    assert probe_shape(wrong.spec, "NCHW", expr)[2:] == (8, 9)
    assert probe_shape(wrong.spec)[2:] == (2, 3)
    rep = prove_region(expr, wrong, _activation(expr))
    assert {"output[random]", "output[activation]", "grad input",
            "grad parameters"} <= _failed(rep)
    assert "(3, 3, 7, 7)" in [c for c in rep.failures if c.name == "grad parameters"][0].detail


def test_model_tensors_untouched():
    expr = dbb()
    before = {k: v.detach().clone() for k, v in rg.parameters(expr).items()}
    fused = rg.reduce(expr)
    w0 = fused.weight.detach().clone()
    assert prove_region(expr, fused, _activation(expr)).ok
    for k, v in rg.parameters(expr).items():
        assert torch.equal(v, before[k]) and v.grad is None and v.dtype == torch.float32, k
    assert torch.equal(fused.weight.detach(), w0)


# ------------------------------------------------------------------ planted faults
def _fault(expr, **changes):
    fused = rg.reduce(expr)
    return prove_region(expr, fused.replace(**changes), _activation(expr), module=True)


def _failed(rep):
    return {c.name for c in rep.failures}


@pytest.mark.parametrize("name", ["repvgg", "dbb", "mobileone_dw", "asym_stride2"])
def test_perturbed_weight_caught_one_ulp_not(name):
    expr = ZOO[name]()
    w = rg.reduce(expr).weight.detach()
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    rep = _fault(expr, weight=w * (1 + 1e-3 * noise))
    assert {"output[random]", "output[activation]", "grad input",
            "module output[activation]"} <= _failed(rep)
    ulp = torch.nextafter(w, torch.full_like(w, float("inf")))
    assert not torch.equal(ulp, w)
    rep = _fault(expr, weight=ulp)
    assert rep.ok, [c.to_dict() for c in rep.failures]


def test_swapped_output_channels_caught():
    expr = repvgg()
    fused = rg.reduce(expr)
    perm = torch.tensor([1, 0, 2, 3])
    rep = _fault(expr, weight=fused.weight.detach()[perm], bias=fused.bias.detach()[perm])
    assert {"output[random]", "grad input"} <= _failed(rep)


def test_dropped_bias_caught():
    expr = repvgg()
    fused = rg.reduce(expr)
    rep = _fault(expr, bias=torch.zeros_like(fused.bias))
    assert "output[random]" in _failed(rep)
    assert "grad input" not in _failed(rep)   # a bias does not change gradients


@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (2, 0, 1, 1), (1, 1, 0, 2)])
def test_wrong_padding_caught(padding):
    expr = repvgg()
    fused = rg.reduce(expr)
    rep = _fault(expr, spec=fused.spec.replace(padding=padding))
    assert "output[random]" in _failed(rep)
    assert "output[activation]" in _failed(rep)


def test_wrong_stride_and_dilation_caught():
    expr = replk()
    fused = rg.reduce(expr)
    assert not _fault(expr, spec=fused.spec.replace(stride=2)).ok
    bad = fused.spec.replace(dilation=2, padding=6)
    assert "output[random]" in _failed(_fault(expr, spec=bad))


def test_non_differentiable_reducer_caught(monkeypatch):
    """A reducer whose result is right but whose weight is cut from autograd gives a wrong
    re-parameterization adjoint: the weight-gradient mapping check must catch it."""
    expr = repvgg()
    real = rg.reduce

    def detached(e):
        f = real(e)
        return f.replace(weight=f.weight.detach())

    monkeypatch.setattr(rg, "reduce", detached)
    rep = prove_region(expr, real(expr))
    failed = _failed(rep)
    assert any(n.endswith("conv1.weight") for n in failed)
    assert not any(n.startswith("output") for n in failed)


def test_wrong_bn_fold_caught():
    """A fused kernel that ignores a BN's running mean (a classic folding bug)."""
    expr = repvgg()
    m = [n for n in _nodes(expr) if isinstance(n, rg.BatchNorm)][0]
    broken = copy.copy(m)
    broken.running_mean = torch.zeros_like(m.running_mean)
    expr2 = rg.Add(tuple(broken if b is m else b for b in expr.inputs))
    rep = prove_region(expr, rg.reduce(expr2))
    assert "output[random]" in _failed(rep)


# ------------------------------------------------------------------ random geometry
@given(c=st.integers(1, 4), o=st.integers(1, 4), k=st.sampled_from([1, 3, 5]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), identity=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_repvgg_like_prove_and_catch(c, o, k, stride, dilation, identity, seed):
    m = Maker(seed)
    x = rg.Input(c)
    pad = dilation * (k - 1) // 2
    branches = [m.convbn(x, c, o, k, stride=stride, padding=pad, dilation=dilation),
                m.convbn(x, c, o, 1, stride=stride)]
    if identity and c == o and stride == 1:
        branches.append(m.bn(x, c))
    expr = rg.Add(tuple(branches))
    fused = rg.reduce(expr)
    act = torch.randn(1, c, 9, 10, generator=torch.Generator().manual_seed(seed))
    rep = prove_region(expr, fused, act)
    assert rep.ok, [f.to_dict() for f in rep.failures]
    w = fused.weight.detach()
    idx = (0, 0, k // 2, (k // 2 + 1) % k)
    bad = w.clone()
    bad[idx] += 1e-3 * max(float(w.abs().max()), 1e-3)
    assert "output[random]" in _failed(prove_region(expr, fused.replace(weight=bad), act))


def test_reflect_padding_and_half_module():
    m = Maker(3)
    x = rg.Input(4)
    c3 = m.conv(x, 4, 4, 3, padding=1)
    c3.spec = c3.spec.replace(padding_mode="reflect")
    expr = rg.Add((m.bn(c3, 4), m.convbn(x, 4, 4, 1)))
    fused = rg.reduce(expr)
    act = torch.randn(1, 4, 9, 9)
    assert prove_region(expr, fused, act, module=True).ok
    bad = fused.replace(spec=fused.spec.replace(padding_mode="zeros"))
    assert {"output[random]", "grad input"} <= _failed(prove_region(expr, bad, act))
    half = prove_region(expr, fused.replace(dtype=torch.float16), act, module=True)
    assert half.ok
    module_checks = [c for c in half.checks if c.name.startswith("module")]
    assert module_checks and all(c.rtol == 1e-2 and c.max_rel > 1e-6 for c in module_checks)
