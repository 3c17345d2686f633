"""Loading and saving: atomic writes, output-path rules, checkpoints, model files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import hostile_corpus  # noqa: E402
from torch import nn

from repfuse.errors import InputError, UnsafeInputError  # noqa: E402
from repfuse.fx.aten import program_module  # noqa: E402
from repfuse.io.atomic import atomic_write, check_output_path, same_file  # noqa: E402
from repfuse.io.checkpoint import (  # noqa: E402
    check_batchnorm,
    check_finite,
    find_state_dict,
    load_weights,
    read_checkpoint,
    strip_prefixes,
)
from repfuse.io.modelfile import (  # noqa: E402
    load_exported_program,
    load_pickled_module,
    program_input_shape,
)
from repfuse.io.writers import output_format, plain_state_dict, write_state_dict  # noqa: E402
from repfuse.onnx.io import load_onnx as _load_onnx  # noqa: E402
from repfuse.onnx.io import onnx_input_shape  # noqa: E402


def load_onnx(path):
    return _load_onnx(path)[0]


def small() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 2)
        m[1].running_mean.normal_()
    return m.eval()


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_creates_parents_and_file(tmp_path):
    out = tmp_path / "a" / "b" / "x.bin"
    atomic_write(out, lambda p: p.write_bytes(b"hello"))
    assert out.read_bytes() == b"hello"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert no_temp_files(tmp_path)


def test_atomic_write_writer_sees_suffix_and_same_folder(tmp_path):
    seen = []
    atomic_write(tmp_path / "m.onnx", lambda p: (seen.append(p), p.write_bytes(b"x")))
    assert seen[0].suffix == ".onnx" and seen[0].parent == tmp_path
    assert seen[0] != tmp_path / "m.onnx" and not seen[0].exists()


def test_atomic_write_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "x.bin"

    def boom(p):
        p.write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(out, boom)
    assert not out.exists() and not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_existing_file(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, lambda p: (_ for _ in ()).throw(KeyboardInterrupt()), force=True)
    assert out.read_bytes() == b"old" and no_temp_files(tmp_path)


def test_atomic_write_refuses_empty_result(tmp_path):
    with pytest.raises(InputError, match="no data"):
        atomic_write(tmp_path / "x.bin", lambda p: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "x.bin"
    out.write_bytes(b"old")
    with pytest.raises(InputError, match="already exists.*--force"):
        atomic_write(out, lambda p: p.write_bytes(b"new"))
    assert out.read_bytes() == b"old"
    out.chmod(0o640)
    atomic_write(out, lambda p: p.write_bytes(b"new"), force=True)
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_output_never_an_input(tmp_path):
    src = tmp_path / "w.pt"
    src.write_bytes(b"weights")
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    hard = tmp_path / "hard.pt"
    os.link(src, hard)
    dotted = tmp_path / "sub" / ".." / "w.pt"
    (tmp_path / "sub").mkdir()
    for out in (src, link, hard, dotted):
        with pytest.raises(InputError, match="input file"):
            atomic_write(out, lambda p: p.write_bytes(b"x"), force=True, inputs=[src])
    assert src.read_bytes() == b"weights"
    assert same_file(link, src) and same_file(hard, src)
    assert not same_file(tmp_path / "other.pt", src)


def test_output_directory_and_suffix(tmp_path):
    with pytest.raises(InputError, match="directory"):
        check_output_path(tmp_path, force=True)
    assert output_format("a/B.ONNX") == ".onnx"
    assert output_format("x.safetensors") == ".safetensors"
    with pytest.raises(InputError, match="unknown format .txt"):
        output_format("x.txt")
    with pytest.raises(InputError, match="no suffix"):
        output_format("model")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip(tmp_path, suffix):
    m = small()
    out = tmp_path / f"m{suffix}"
    sd = plain_state_dict(m)
    atomic_write(out, lambda p: write_state_dict(sd, p))
    loaded = read_checkpoint(out)
    assert loaded.keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(loaded[k], v)


def test_plain_state_dict_breaks_sharing():
    m = small()
    m.add_module("tied", m[0])
    sd = plain_state_dict(m)
    assert sd["0.weight"].data_ptr() != sd["tied.weight"].data_ptr()
    assert sd["0.weight"].data_ptr() != m[0].weight.data_ptr()


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("key", ["state_dict", "model", "ema", "model_ema", "state_dict_ema"])
def test_nested_checkpoints(tmp_path, key):
    m = small()
    path = tmp_path / "c.pth"
    torch.save({"epoch": 7, key: m.state_dict(), "optimizer": {"lr": 0.1}}, path)
    notes = []
    sd = read_checkpoint(path, notes=notes)
    assert sd.keys() == m.state_dict().keys()
    assert key in notes[0]


def test_ema_weights_preferred():
    a, b = small().state_dict(), {k: v + 1 for k, v in small().state_dict().items()}
    sd, where = find_state_dict({"state_dict": a, "state_dict_ema": b})
    assert where == "['state_dict_ema']" and torch.equal(sd["0.weight"], b["0.weight"])


def test_prefixes_stripped_when_they_help():
    m = small()
    wrapped = {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}
    assert strip_prefixes(wrapped, set(m.state_dict())).keys() == m.state_dict().keys()
    target = nn.Module()
    target.model = small()
    keys = set(target.state_dict())
    prefixed = {f"model.{k}": v for k, v in m.state_dict().items()}
    assert strip_prefixes(prefixed, keys).keys() == prefixed.keys()   # "model." is real here


def test_load_weights_module_prefix_and_values(tmp_path):
    src, dst = small(), nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.Conv2d(4, 2, 1))
    path = tmp_path / "dp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    assert load_weights(dst, read_checkpoint(path)) == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_mismatch_lists_keys_and_counts():
    m = small()
    sd = dict(m.state_dict())
    sd.pop("0.weight")
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(InputError) as info:
        load_weights(small(), sd, source="ck.pth", model_name="net")
    msg = str(info.value)
    assert "ck.pth does not match net" in msg and "\n" not in msg
    assert "2 missing (0.weight, 0.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "1 mis-shaped (3.weight: checkpoint (5, 4, 1, 1) vs model (2, 4, 1, 1))" in msg


def test_mismatch_shows_only_a_few():
    m = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(10)])
    with pytest.raises(InputError, match=r"20 missing \(0.weight, 0.bias, 1.weight, \.\.\.\)"):
        load_weights(m, {"x": torch.zeros(1)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoint_cast_with_note(dtype):
    src, dst = small(), small()
    nn.init.zeros_(dst[0].weight)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    notes = load_weights(dst, half, source="h.pth")
    assert len(notes) == 1 and str(dtype)[6:] in notes[0] and "float32" in notes[0]
    assert dst[0].weight.dtype == torch.float32
    assert torch.equal(dst[0].weight, src[0].weight.to(dtype).float())


def test_nonfinite_refused():
    check_finite({"a": torch.ones(3), "n": torch.arange(3)})
    with pytest.raises(InputError, match="b has 1 NaN"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([0.0, float("nan")])})
    with pytest.raises(InputError, match="c has 2 infinite"):
        check_finite({"c": torch.tensor([float("inf"), -float("inf")])})


def test_batchnorm_variance_checks():
    m = small()
    assert check_batchnorm(m) == []
    m[1].running_var[2] = 0.0
    notes = check_batchnorm(m)
    assert len(notes) == 1 and "BatchNorm 1: running_var is 0 in 1 of 4" in notes[0]
    m[1].eps = 0.0
    with pytest.raises(InputError, match=r"BatchNorm 1: running_var \+ eps is 0 in 1 channels"):
        check_batchnorm(m)
    m[1].eps = 1e-5
    m[1].running_var[1] = -1e-3
    with pytest.raises(InputError, match=r"BatchNorm 1: running_var is negative in 1 of 4"):
        check_batchnorm(m)


def test_safe_load_refuses_code(tmp_path):
    case = hostile_corpus.build("evil_checkpoint", tmp_path)
    path = next(iter(case.unchanged))
    with pytest.raises(UnsafeInputError, match="posix.system|os.system"):
        read_checkpoint(path)
    assert not case.marker.exists()


def test_missing_checkpoint():
    with pytest.raises(InputError, match="does not exist"):
        read_checkpoint("/nonexistent/x.pth")


# ----------------------------------------------------------------------------- model files
def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(small(), path)
    with pytest.raises(UnsafeInputError, match="--trust-pickle"):
        load_pickled_module(path)
    m = load_pickled_module(path, trust_pickle=True)
    assert isinstance(m, nn.Sequential)
    torch.save(small().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError, match="not a model"):
        load_pickled_module(tmp_path / "sd.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not an nn.Module"):
        load_pickled_module(tmp_path / "list.pt", trust_pickle=True)


def test_exported_program_needs_trust(tmp_path):
    m = small()
    program = torch.export.export(m, (torch.randn(2, 3, 8, 8),))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    with pytest.raises(UnsafeInputError, match="--trust-pickle"):
        load_exported_program(path)
    loaded = load_exported_program(path, trust_pickle=True)
    assert program_input_shape(loaded) == (2, 3, 8, 8)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module()(x), m(x))


def test_exported_program_lowered_for_fusion(tmp_path):
    import torch.nn.functional as F

    m = hostile_corpus.tiny_module(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    module = program_module(torch.export.export(m, (x,)), x)
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    assert F.conv2d in targets and F.batch_norm in targets
    assert not any("aten.conv2d" in str(t) or "aten.batch_norm" in str(t) for t in targets)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x), m(x))


def test_onnx_loads_and_reports_shape(tmp_path):
    path = hostile_corpus.onnx_file(tmp_path, "ok.onnx", hostile_corpus.onnx_conv_model())
    model = load_onnx(path)
    assert onnx_input_shape(model) == (1, 3, 8, 8)


def test_onnx_absurd_and_negative_shapes(tmp_path):
    huge = hostile_corpus.onnx_conv_model(input_dims=(1, 3, 1 << 20, 1 << 20))
    with pytest.raises(InputError, match="not a real model input"):
        load_onnx(hostile_corpus.onnx_file(tmp_path, "h.onnx", huge))
    neg = hostile_corpus.onnx_conv_model(input_dims=(1, 3, -8, 8))
    with pytest.raises(InputError, match="negative"):
        load_onnx(hostile_corpus.onnx_file(tmp_path, "n.onnx", neg))
