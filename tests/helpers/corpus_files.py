"""Building blocks of the hostile-input corpus: a tiny training-form net (as source, for
--factory), hostile pickles, small ONNX graphs, and the ``Case`` record (see hostile_corpus.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

TINYNET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.skip(x))


class TinyNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))
        self.block = Block(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


class OtherNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Linear(4, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class SharedConv(nn.Module):
    """A block whose conv module is called twice: its regions cannot be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x) + self.bn(x)
        return self.conv(torch.relu(y))


def build():
    return TinyNet(8)


def build_shared():
    return SharedConv()


def build_wide():
    return TinyNet(12)


def build_other():
    return OtherNet()


def build_eps0():
    model = TinyNet(8)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model


def broken():
    raise RuntimeError("factory exploded")


def not_a_module():
    return 42
'''

SHAPE = "1,3,16,16"


@dataclass
class Case:
    """One hostile input and what the command must do with it."""

    args: list[str]
    code: int = 2
    needles: tuple[str, ...] = ()             # words the one-line error must contain
    output: Path | None = None                # must not exist afterwards
    unchanged: dict[Path, bytes] = field(default_factory=dict)   # files that must not change
    marker: Path | None = None                # must never be created
    cwd: Path | None = None


class Evil:
    """Pickles to a call of ``os.system`` that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ----------------------------------------------------------------------------- helpers
def tinynet_file(folder: Path) -> Path:
    path = folder / "tinynet.py"
    if not path.exists():
        path.write_text(TINYNET)
    return path


def factory(folder: Path, fn: str = "build") -> str:
    return f"{tinynet_file(folder)}:{fn}"


def tiny_module(folder: Path, fn: str = "build") -> nn.Module:
    namespace: dict = {}
    exec(compile(TINYNET, "tinynet", "exec"), namespace)  # the corpus's own, trusted source
    torch.manual_seed(0)
    model = namespace[fn]().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def tiny_state_dict(folder: Path, fn: str = "build") -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_module(folder, fn).state_dict().items()}


def save(folder: Path, name: str, obj, **kwargs) -> Path:
    path = folder / name
    torch.save(obj, path, **kwargs)
    return path


def write_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def convert(folder: Path, *extra: str, out: str = "out.onnx", shape: str | None = SHAPE) -> list:
    args = ["convert", *extra, "-o", str(folder / out)]
    return args + (["--input-shape", shape] if shape is not None else [])


def weights_case(folder: Path, path: Path, *needles: str, code: int = 2) -> Case:
    return Case(convert(folder, "--factory", factory(folder), "--weights", str(path)), code,
                needles, folder / "out.onnx", {path: path.read_bytes()})


def onnx_conv_model(*, w_initializer: bool = True, input_dims=(1, 3, 8, 8),
                    duplicate_output: bool = False, external: str | None = None,
                    ir_version: int = 8) -> onnx.ModelProto:
    """A small Conv + BatchNormalization + Add model, optionally broken in one way."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(input_dims))
    w = numpy_helper.from_array(torch.randn(3, 3, 3, 3).numpy(), "W")
    bn = [numpy_helper.from_array(v.numpy(), n) for n, v in
          (("s", torch.ones(3)), ("b", torch.zeros(3)), ("m", torch.zeros(3)),
           ("v", torch.ones(3)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Add", ["c", "n"], ["y"], name="add")]
    if duplicate_output:
        nodes.append(helper.make_node("Relu", ["x"], ["c"], name="dup"))
    inits = ([w] if w_initializer else []) + bn
    if external is not None:
        w.ClearField("raw_data")
        w.ClearField("float_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "324")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=ir_version)


def onnx_file(folder: Path, name: str, model: onnx.ModelProto) -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def onnx_case(folder: Path, path: Path, *needles: str, out: str = "out.onnx") -> Case:
    return Case(convert(folder, str(path), out=out, shape=None), 2, needles, folder / out,
                {path: path.read_bytes()})


def shape_case(folder: Path, shape: str, *needles: str) -> Case:
    return Case(convert(folder, "--factory", factory(folder), shape=shape), 2,
                ("--input-shape", *needles), folder / "out.onnx")
