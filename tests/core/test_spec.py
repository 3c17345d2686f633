import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from repfuse.core.spec import ConvSpec
from repfuse.errors import GeometryError


@given(k=st.integers(1, 7), s=st.integers(1, 3), d=st.integers(1, 3),
       pads=st.tuples(*[st.integers(0, 3)] * 4), h=st.integers(1, 12), w=st.integers(1, 12))
def test_output_size_matches_torch(k, s, d, pads, h, w):
    spec = ConvSpec(2, 2, (k, k + 1), s, pads, d)
    t, b, l, r = pads
    x = F.pad(torch.zeros(1, 2, h, w), (l, r, t, b))
    try:
        expected = F.conv2d(x, torch.zeros(2, 2, k, k + 1), stride=s, dilation=d).shape[2:]
    except RuntimeError:
        with pytest.raises(GeometryError, match="empty output"):
            spec.output_size((h, w))
        return
    assert spec.output_size((h, w)) == tuple(expected)


@given(k=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 3), p=st.integers(0, 3),
       op=st.integers(0, 2), h=st.integers(1, 8))
def test_transposed_output_size_matches_torch(k, s, d, p, op, h):
    if op >= max(s, d):
        with pytest.raises(GeometryError, match="output_padding"):
            ConvSpec(2, 4, k, s, p, d, transposed=True, output_padding=op)
        return
    spec = ConvSpec(2, 4, k, s, p, d, groups=2, transposed=True, output_padding=op)
    assert spec.weight_shape == (2, 2, k, k)
    try:
        y = F.conv_transpose2d(torch.zeros(1, 2, h, h), torch.zeros(2, 2, k, k), stride=s,
                               padding=p, output_padding=op, dilation=d, groups=2)
    except RuntimeError:
        y = torch.zeros(0, 0, 0, 0)
    if y.numel() == 0:  # torch returns an empty tensor; repfuse refuses empty outputs
        with pytest.raises(GeometryError, match="empty output"):
            spec.output_size((h, h))
        return
    assert spec.output_size((h, h)) == tuple(y.shape[2:])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="groups=3 does not divide in_channels=16"):
        ConvSpec(16, 6, 3, groups=3)
    with pytest.raises(ValueError, match="padding_mode='mirror'"):
        ConvSpec(4, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="stride"):
        ConvSpec(4, 4, 3, stride=0)
    with pytest.raises(ValueError, match="padding='same' needs stride=1"):
        ConvSpec(4, 4, 3, stride=2, padding="same")
    spec = ConvSpec(4, 8, 3)
    with pytest.raises(ValueError, match="input has 3 channels"):
        spec.check_input((1, 3, 8, 8))
    with pytest.raises(ValueError, match="weight has shape"):
        spec.check_weight((8, 4, 3, 2))


def test_layouts_and_from_weight():
    spec = ConvSpec.from_weight((8, 3, 3, 2), groups=2, layout="NHWC")
    assert (spec.in_channels, spec.out_channels, spec.kernel_size) == (4, 8, (3, 3))
    assert spec.torch_weight_shape == (8, 2, 3, 3)
    t = ConvSpec.from_weight((4, 3, 2, 2), groups=2, transposed=True)
    assert (t.in_channels, t.out_channels) == (4, 6)
    assert t.replace(layout="NHWC").weight_shape == (6, 2, 2, 2)
    assert ConvSpec(4, 4, (3, 4), padding="same").padding == (1, 1, 1, 2)


def test_alignment_and_taps():
    big = ConvSpec(4, 4, 3, padding=1)
    assert big.aligned_with(ConvSpec(4, 4, 1, padding=0))
    assert not big.aligned_with(ConvSpec(4, 4, 1, padding=1))
    assert big.aligned_with(ConvSpec(4, 4, (1, 3), padding=(0, 1)))
    assert big.tap_offsets(0) == (-1, 0, 1)
    assert ConvSpec(4, 4, 3, padding=2, dilation=2).tap_offsets(1) == (-2, 0, 2)
    assert big.reads(2, 3, 0, 2) == (1, 4)
    assert ConvSpec(4, 8, 3, stride=2, groups=4, dilation=2).describe() == "conv3x3/s2 d2 g4"


@given(k=st.integers(1, 5), s=st.integers(1, 3), p=st.one_of(st.integers(0, 3), st.tuples(
    *[st.integers(0, 3)] * 4), st.just("valid")), d=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 4]), layout=st.sampled_from(["NCHW", "NHWC"]))
def test_replace_normalises_and_validates_as_construction(k, s, p, d, groups, layout):
    base = ConvSpec(8, 8, 3, 1, 1)
    changes = dict(kernel_size=[k, k], stride=s, padding=p, dilation=(d, d), groups=groups,
                   layout=layout)
    made = ConvSpec(8, 8, [k, k], s, p, (d, d), groups, layout=layout)
    replaced = base.replace(**changes)
    assert replaced == made and hash(replaced) == hash(made)
    assert type(replaced.kernel_size) is tuple and type(replaced.padding) is tuple
    assert base == ConvSpec(8, 8, 3, 1, 1)   # the original is not changed


def test_replace_rejects_what_construction_rejects():
    base = ConvSpec(8, 8, 3)
    with pytest.raises(GeometryError, match="groups=3"):
        base.replace(groups=3)
    with pytest.raises(GeometryError, match="stride"):
        base.replace(stride=True)
    with pytest.raises(GeometryError, match="padding"):
        base.replace(padding=(1, -1, 0, 0))
    with pytest.raises(TypeError, match="no field 'strides'"):
        base.replace(strides=2)
