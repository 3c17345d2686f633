"""ONNX files: external data (confined to the model's folder), broken inputs, atomic
saving, and export_onnx (checks, dynamic batch, opset fallback, nothing written on
failure)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from helpers.onnx_graphs import assert_same, ops, repvgg_block
from torch import nn

import repfuse
from repfuse.errors import InputError, VerificationError
from repfuse.onnx.io import load_onnx, save_onnx


def _with_external_data(tmp_path, location="weights.bin"):
    _, m = repvgg_block()
    path = tmp_path / "model.onnx"
    external = onnx.ModelProto()
    external.CopyFrom(m)
    onnx.save_model(external, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return m, path


def test_external_data_is_read_from_the_model_folder(tmp_path):
    m, path = _with_external_data(tmp_path)
    raw = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    res = repfuse.fuse_onnx(str(path))
    assert ops(res.model) == ["Conv", "Relu"]
    assert_same(m, res.model)
    with pytest.raises(InputError, match="pass the model's file path"):
        repfuse.fuse_onnx(raw)


def _set_location(path, location):
    raw = onnx.load(str(path), load_external_data=False)
    for t in raw.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(raw, str(path))


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin",
                                      "/etc/passwd", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    _, path = _with_external_data(inner)
    os.replace(inner / "weights.bin", tmp_path / "weights.bin")
    if location == "link.bin":
        os.symlink(tmp_path / "weights.bin", inner / "link.bin")
    _set_location(path, location)
    with pytest.raises(InputError, match="model.onnx.*(outside|leaves|relative)"):
        repfuse.fuse_onnx(str(path))


def test_missing_external_file(tmp_path):
    _, path = _with_external_data(tmp_path)
    os.unlink(tmp_path / "weights.bin")
    with pytest.raises(InputError, match="does not exist"):
        repfuse.fuse_onnx(str(path))


def test_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    with pytest.raises(InputError, match="junk.onnx: not an ONNX model"):
        repfuse.fuse_onnx(str(path))
    with pytest.raises(InputError, match="no such file"):
        repfuse.fuse_onnx(str(tmp_path / "absent.onnx"))
    with pytest.raises(InputError, match="path or an onnx.ModelProto"):
        repfuse.fuse_onnx(42)


def test_missing_initializer(tmp_path):
    _, m = repvgg_block()
    del m.graph.initializer[0]
    path = tmp_path / "broken.onnx"
    onnx.save(m, str(path))
    with pytest.raises(InputError, match=r"broken.onnx: node 'conv\d+' \(Conv\) reads 'c\d+'.*"
                                         "missing initializer"):
        repfuse.fuse_onnx(str(path))


def test_failing_checker(tmp_path):
    _, m = repvgg_block()
    m.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(InputError, match="bad.onnx: fails the ONNX checker"):
        repfuse.fuse_onnx(str(path))


def test_save_is_atomic_and_never_overwrites_the_input(tmp_path):
    _, m = repvgg_block()
    src = tmp_path / "in.onnx"
    onnx.save(m, str(src))
    fused = repfuse.fuse_onnx(str(src)).model
    with pytest.raises(InputError, match="never overwrites its input"):
        save_onnx(fused, src, inputs=[src])
    out = save_onnx(fused, tmp_path / "out.onnx", inputs=[src])
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]
    assert load_onnx(out)[0] == fused
    with pytest.raises(InputError, match="is a directory"):
        save_onnx(fused, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.conv(x))


@pytest.mark.parametrize("opset", [13, 18])
def test_export_onnx_checks_and_writes(tmp_path, opset):
    model = Small().train()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "small.onnx"
    report = repfuse.export_onnx(model, x, path, opset=opset)
    assert model.training  # mode restored
    assert report.ok and len(report.checks) == 3  # example, random, other batch
    assert any("batch 3" in c.name for c in report.checks)
    assert os.listdir(tmp_path) == ["small.onnx"]
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == opset
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 8, 8)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x5.numpy()})
    with torch.no_grad():
        ref = model.eval()(x5).numpy()
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_export_onnx_failure_writes_nothing(tmp_path, monkeypatch):
    import repfuse.onnx.export as io_mod

    other = Small().eval()
    real = io_mod._export_proto
    monkeypatch.setattr(io_mod, "_export_proto",
                        lambda model, args, opset, dyn: real(other, args, opset, dyn))
    path = tmp_path / "small.onnx"
    with pytest.raises(VerificationError, match="small.onnx.*disagrees with torch.*max rel"):
        repfuse.export_onnx(Small(), torch.randn(1, 3, 8, 8), path)
    assert os.listdir(tmp_path) == []


def test_ort_reason_keeps_the_cause_and_drops_the_noise():
    ort = pytest.importorskip("onnxruntime")
    from helpers.corpus_files import onnx_conv_model

    from repfuse.onnx.runtime import ort_reason

    def refusal(model):
        with pytest.raises(Exception) as info:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return info.value

    custom = onnx_conv_model()
    custom.graph.node[-1].output[0] = "a"
    custom.graph.node.append(onnx.helper.make_node("Mystery", ["a"], ["y"], domain="org.example"))
    custom.opset_import.append(onnx.helper.make_opsetid("org.example", 1))
    reason = ort_reason(refusal(custom))
    assert reason.startswith("org.example:Mystery") and "registered" in reason, reason
    future = onnx_conv_model(ir_version=99)
    reason = ort_reason(refusal(future))
    assert "IR version" in reason and "99" in reason, reason
    assert "onnxruntime::" not in reason and ".cc:" not in reason, reason
    assert ort_reason(ValueError("first\nsecond")) == "ValueError: first"
