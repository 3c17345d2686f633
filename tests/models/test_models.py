"""repfuse.models: registry, parameter counts vs the papers, official checkpoint layout,
strict checkpoint loading, seeded realistic weights, and the building blocks' maths."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers.models import (
    ALL,
    MOBILEONE,
    PUBLISHED,
    REPVGG,
    RESNETS,
    analytic_fused_count,
    check_published,
    count,
    meta_model,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from repfuse import models
from repfuse.errors import InputError
from repfuse.models.acnet import ACBlock
from repfuse.models.dbb import DiverseBranchBlock
from repfuse.models.layers import BNAndPad, IdentityBasedConv1x1
from repfuse.models.repvgg import RepVGGBlock


def test_registry_names():
    assert sorted(ALL) == models.names()


@pytest.mark.parametrize("typo, expected", [("repvgg_a9", "repvgg_a0"),
                                            ("mobileone-s0", "mobileone_s0"),
                                            ("RepVGG_B1g4", "repvgg_b1g4")])
def test_unknown_name_lists_close_matches(typo, expected):
    with pytest.raises(InputError, match=expected) as info:
        models.create(typo)
    assert typo in str(info.value) and "\n" not in str(info.value)


def test_unknown_option_is_an_input_error():
    with pytest.raises(InputError, match="width.*num_classes"):
        models.create("repvgg_a0", width=2)


def test_register_twice_rejected():
    def repvgg_a0(num_classes=1000):
        return nn.Identity()

    with pytest.raises(ValueError, match="repvgg_a0"):
        models.register_model(repvgg_a0)


def test_no_per_block_fuse_methods():
    pattern = re.compile(r"fuse|deploy|reparam|switch|convert|merge", re.IGNORECASE)
    classes = {type(m) for name in ALL for m in meta_model(name).modules()}
    ours = [c for c in classes if c.__module__.startswith("repfuse.models")]
    assert len(ours) >= 9
    for cls in ours:
        for klass in cls.__mro__:
            if klass.__module__.startswith("repfuse.models"):
                bad = [a for a in vars(klass) if pattern.search(a)]
                assert not bad, (cls.__name__, bad)


# ----------------------------------------------------------------------------- counts

@pytest.mark.parametrize("name", ALL)
def test_parameter_counts_match_published(name):
    model = meta_model(name)
    train, fused = PUBLISHED[name]
    if train is not None:
        check_published(name, count(model), train)
    check_published(name, analytic_fused_count(model), fused)


def test_resnet18_variants_fuse_to_resnet18():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ref = tv.models.resnet18()
    bn_channels = sum(m.num_features for m in ref.modules() if isinstance(m, nn.BatchNorm2d))
    for name in RESNETS:
        # a conv+BN pair becomes a conv with bias: 2C BN parameters become C biases
        assert analytic_fused_count(meta_model(name)) == count(ref) - bn_channels


@pytest.mark.parametrize("name", [n for n in REPVGG + MOBILEONE if n != "repvgg_b1g2"])
def test_state_dict_shapes_match_timm(name):
    """timm's independent implementations (all but B1g2, which timm lacks) hold the same
    tensors (timm's names differ)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False)
    ours = meta_model(name)
    shapes = Counter(tuple(v.shape) for v in ours.state_dict().values())
    assert shapes == Counter(tuple(v.shape) for v in ref.state_dict().values())


@pytest.mark.parametrize("name", MOBILEONE)
def test_mobileone_counts_equal_timm_reparameterized(name):
    timm = pytest.importorskip("timm")
    from timm.utils import reparameterize_model

    ref = timm.create_model(name, pretrained=False)
    with torch.device("meta"):
        ours = models.builder(name)()
    assert count(ours) == count(ref)
    assert analytic_fused_count(ours) == count(reparameterize_model(ref))


# ----------------------------------------------------------------------------- layout

OFFICIAL_KEYS = {
    # DingXiaoH/RepVGG repvgg.py
    "repvgg_a0": {
        "stage0.rbr_dense.conv.weight": (48, 3, 3, 3),
        "stage0.rbr_dense.bn.running_mean": (48,),
        "stage0.rbr_1x1.conv.weight": (48, 3, 1, 1),
        "stage0.rbr_1x1.bn.running_var": (48,),
        "stage1.0.rbr_dense.conv.weight": (48, 48, 3, 3),
        "stage1.1.rbr_identity.weight": (48,),
        "stage1.1.rbr_identity.num_batches_tracked": (),
        "stage4.0.rbr_dense.conv.weight": (1280, 192, 3, 3),
        "linear.weight": (1000, 1280),
        "linear.bias": (1000,),
    },
    "repvgg_b1g4": {  # groups on layers 2, 4, ..., 26 (layer 1 = stage1.0)
        "stage1.0.rbr_dense.conv.weight": (128, 64, 3, 3),
        "stage1.1.rbr_dense.conv.weight": (128, 32, 3, 3),
        "stage1.1.rbr_1x1.conv.weight": (128, 32, 1, 1),
        "stage1.2.rbr_dense.conv.weight": (128, 128, 3, 3),
        "stage2.0.rbr_dense.conv.weight": (256, 128, 3, 3),
        "stage2.1.rbr_dense.conv.weight": (256, 64, 3, 3),
        "stage4.0.rbr_dense.conv.weight": (2048, 512, 3, 3),  # layer 27: dense
    },
    # apple/ml-mobileone mobileone.py
    "mobileone_s0": {
        "stage0.rbr_conv.0.conv.weight": (48, 3, 3, 3),
        "stage0.rbr_scale.conv.weight": (48, 3, 1, 1),
        "stage1.0.rbr_conv.0.conv.weight": (48, 1, 3, 3),
        "stage1.0.rbr_conv.3.bn.running_var": (48,),
        "stage1.0.rbr_scale.bn.weight": (48,),
        "stage1.1.rbr_skip.running_mean": (48,),
        "stage1.1.rbr_conv.3.conv.weight": (48, 48, 1, 1),
        "stage2.1.rbr_conv.0.conv.weight": (128, 48, 1, 1),
        "linear.weight": (1000, 1024),
    },
    "mobileone_s4": {
        "stage3.10.se.reduce.weight": (56, 896, 1, 1),
        "stage3.19.se.expand.bias": (896,),
        "stage4.0.se.reduce.weight": (56, 896, 1, 1),
        "stage4.1.se.expand.weight": (2048, 128, 1, 1),
        "linear.weight": (1000, 2048),
    },
    # DingXiaoH/DiverseBranchBlock resnet.py + diversebranchblock.py
    "dbb_resnet18": {
        "stage0.conv1.conv.weight": (64, 3, 7, 7),
        "stage0.conv1.bn.running_var": (64,),
        "stage1.0.conv1.dbb_origin.conv.weight": (64, 64, 3, 3),
        "stage1.0.conv1.dbb_origin.bn.weight": (64,),
        "stage1.0.conv1.dbb_1x1.conv.weight": (64, 64, 1, 1),
        "stage1.0.conv1.dbb_avg.conv.weight": (64, 64, 1, 1),
        "stage1.0.conv1.dbb_avg.bn.bn.running_mean": (64,),
        "stage1.0.conv1.dbb_avg.avgbn.weight": (64,),
        "stage1.0.conv1.dbb_1x1_kxk.idconv1.weight": (64, 64, 1, 1),
        "stage1.0.conv1.dbb_1x1_kxk.bn1.bn.weight": (64,),
        "stage1.0.conv1.dbb_1x1_kxk.conv2.weight": (64, 64, 3, 3),
        "stage1.0.conv1.dbb_1x1_kxk.bn2.bias": (64,),
        "stage2.0.shortcut.conv.weight": (128, 64, 1, 1),
        "stage2.0.shortcut.bn.weight": (128,),
        "linear.weight": (1000, 512),
    },
    # DingXiaoH/ACNet acb.py in the same ResNet layout
    "acnet_resnet18": {
        "stage1.0.conv1.square_conv.weight": (64, 64, 3, 3),
        "stage1.0.conv1.square_bn.running_mean": (64,),
        "stage1.0.conv1.ver_conv.weight": (64, 64, 3, 1),
        "stage1.0.conv1.ver_bn.weight": (64,),
        "stage1.0.conv1.hor_conv.weight": (64, 64, 1, 3),
        "stage1.0.conv1.hor_bn.running_var": (64,),
        "stage4.1.conv2.square_conv.weight": (512, 512, 3, 3),
    },
}
ABSENT_KEYS = {
    "repvgg_a0": ["stage0.rbr_identity.weight", "stage1.0.rbr_identity.weight",
                  "stage0.rbr_reparam.weight"],
    "mobileone_s0": ["stage0.rbr_conv.1.conv.weight", "stage0.rbr_skip.weight",
                     "stage1.0.rbr_skip.weight", "stage1.1.rbr_scale.conv.weight",
                     "stage1.0.se.reduce.weight"],
    "mobileone_s4": ["stage3.9.se.reduce.weight", "stage1.0.rbr_conv.1.conv.weight"],
    "dbb_resnet18": ["stage1.0.shortcut.conv.weight", "stage1.0.conv1.dbb_1x1_kxk.conv1.weight"],
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_names_and_shapes(name):
    state = meta_model(name).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in state, key


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "dbb_resnet18", "acnet_resnet18"])
def test_official_layout_checkpoint_loads_strict(name, tmp_path):
    source = models.create(name, seed=1, num_classes=10, calibration_shape=(2, 3, 32, 32))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for key in OFFICIAL_KEYS[name]:
        if key.startswith("linear"):
            continue
        assert key in state
    path = tmp_path / "train.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    target = models.create(name, seed=2, num_classes=10, realistic_bn=False)
    models.load_checkpoint(target, path)
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_checkpoint_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = models.create("repvgg_a0", seed=3, num_classes=5, calibration_shape=(2, 3, 32, 32))
    save_file(source.state_dict(), str(tmp_path / "a0.safetensors"))
    target = models.load_checkpoint(models.create("repvgg_a0", num_classes=5),
                                    tmp_path / "a0.safetensors")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)


def test_checkpoint_of_other_architecture_names_keys():
    a0 = meta_model("repvgg_a0").state_dict()
    with torch.device("meta"):
        a1 = models.builder("repvgg_a1")()
    with pytest.raises(InputError) as info:
        models.load_checkpoint(a1, a0, name="repvgg_a1")
    msg = str(info.value)
    assert "repvgg_a1" in msg and "\n" not in msg
    assert "mis-shaped" in msg and "missing" not in msg and "unexpected" not in msg
    assert "stage0.rbr_dense.conv.weight: checkpoint (48, 3, 3, 3) vs model (64, 3, 3, 3)" in msg
    n_shapes = sum(a0[k].shape != v.shape for k, v in a1.state_dict().items())
    assert f"{n_shapes} mis-shaped" in msg


def test_checkpoint_missing_and_unexpected_keys():
    b0 = meta_model("repvgg_b0").state_dict()
    target = meta_model("repvgg_a0")
    with pytest.raises(InputError) as info:
        models.load_checkpoint(target, b0)
    msg = str(info.value)
    # num_batches_tracked is a counter, not a weight: checkpoints with or without it load
    unexpected = [k for k in b0 if k not in target.state_dict()
                  and not k.endswith("num_batches_tracked")]
    assert unexpected and f"{len(unexpected)} unexpected" in msg
    assert unexpected[0].startswith("stage1.2.") and unexpected[0] in msg
    assert "mis-shaped" in msg and "RepVGG" in msg

    mobile = meta_model("mobileone_s0").state_dict()
    with pytest.raises(InputError) as info:
        models.load_checkpoint(target, mobile)
    msg = str(info.value)
    missing = [k for k in target.state_dict() if k not in mobile
               and not k.endswith("num_batches_tracked")]
    extra = [k for k in mobile if k not in target.state_dict()
             and not k.endswith("num_batches_tracked")]
    assert f"{len(missing)} missing" in msg and f"{len(extra)} unexpected" in msg
    assert missing[0] in msg and extra[0] in msg and "..." in msg


def test_checkpoint_rejects_non_tensors_and_missing_files(tmp_path):
    model = meta_model("repvgg_a0")
    with pytest.raises(InputError, match="not a tensor"):
        models.load_checkpoint(model, {"linear.weight": [1, 2]})
    with pytest.raises(InputError, match="does not exist"):
        models.load_checkpoint(model, tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pth"):
        models.load_checkpoint(model, tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- init

def _small(name="repvgg_a0", **kw):
    kw.setdefault("calibration_shape", (2, 3, 32, 32))
    return models.create(name, num_classes=10, **kw)


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = _small(seed=0), _small(seed=0), _small(seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stage1.0.rbr_dense.conv.weight"],
                           sc["stage1.0.rbr_dense.conv.weight"])


@pytest.mark.parametrize("name", ["repvgg_a0", "dbb_resnet18"])
def test_realistic_batchnorm_statistics(name):
    model = _small(name, seed=0)
    assert not model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))
        assert bn.momentum == 0.1 and bool((bn.running_var > 0).all())
    ids = [m for m in model.modules() if isinstance(m, IdentityBasedConv1x1)]
    assert all(m.weight.abs().sum() > 0 for m in ids)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_plain_initialisation_keeps_defaults():
    model = models.create("dbb_resnet18", seed=0, realistic_bn=False)
    assert not model.training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        if isinstance(m, IdentityBasedConv1x1):
            assert torch.equal(m.weight, torch.zeros_like(m.weight))


# ----------------------------------------------------------------------------- blocks

def _random_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.2)
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))


@given(c=st.integers(1, 6), pad=st.integers(0, 3), h=st.integers(1, 7), w=st.integers(1, 7),
       seed=st.integers(0, 2**31 - 1))
def test_bn_and_pad_matches_reference(c, pad, h, w, seed):
    """Eval: normalise, then fill a ``pad``-pixel border with beta - mean * gamma / std.
    Train: batch statistics from the unpadded input, border from the running statistics."""
    gen = torch.Generator().manual_seed(seed)
    layer = BNAndPad(pad, c).double()
    _random_bn(layer.bn, gen)
    x = torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
    bn = layer.bn

    def reference(inner):
        value = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out = value.view(1, c, 1, 1).expand(2, c, h + 2 * pad, w + 2 * pad).clone()
        out[:, :, pad:pad + h, pad:pad + w] = inner
        return out

    with torch.no_grad():
        layer.eval()
        inner = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                             0.0, bn.eps)
        torch.testing.assert_close(layer(x), reference(inner), rtol=1e-12, atol=1e-12)
        layer.train()
        running = bn.running_mean.clone(), bn.running_var.clone()
        got = layer(x)
        assert not torch.equal(bn.running_mean, running[0])  # updated, then used for the border
        inner = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        torch.testing.assert_close(got, reference(inner), rtol=1e-12, atol=1e-12)


@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_identity_based_conv1x1(groups, per_group, seed):
    gen = torch.Generator().manual_seed(seed)
    c = groups * per_group
    layer = IdentityBasedConv1x1(c, groups).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    eye = torch.zeros(c, per_group, 1, 1, dtype=torch.float64)
    for i in range(c):
        eye[i, i % per_group, 0, 0] = 1.0
    x = torch.randn(2, c, 5, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = F.conv2d(x, layer.weight + eye, groups=groups)
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert list(dict(layer.state_dict())) == ["weight"]


@given(k=st.sampled_from([1, 3, 5]), extra=st.integers(0, 2), stride=st.integers(1, 3),
       h=st.integers(1, 9), w=st.integers(1, 9), groups=st.sampled_from([1, 2]))
def test_acblock_branches_align(k, extra, stride, h, w, groups):
    """The kx1 and 1xk branches produce the kxk branch's output grid for any geometry."""
    pad = k // 2 + extra
    if h + 2 * pad < k or w + 2 * pad < k:
        return
    block = ACBlock(2, 4, k, stride=stride, padding=pad, groups=groups).eval()
    x = torch.randn(1, 2, h, w)
    with torch.no_grad():
        out = block(x)
        ref = F.conv2d(x, block.square_conv.weight, stride=stride, padding=pad, groups=groups)
    assert out.shape == ref.shape


def test_block_argument_errors():
    with pytest.raises(ValueError, match="padding"):
        RepVGGBlock(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="padding"):
        DiverseBranchBlock(4, 4, 3, padding=2)
    with pytest.raises(ValueError, match="padding"):
        ACBlock(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="groups"):
        IdentityBasedConv1x1(6, 4)


def test_depthwise_dbb_uses_pool_only_branch_and_wide_internal_conv():
    block = DiverseBranchBlock(8, 8, 3, padding=1, groups=8)
    assert not hasattr(block, "dbb_1x1") and not hasattr(block.dbb_avg, "conv")
    assert block.dbb_1x1_kxk.conv1.weight.shape == (16, 1, 1, 1)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert block.eval()(x).shape == x.shape
