"""A corpus of broken and hostile inputs for the ``repfuse`` command, generated on the fly.

No binary blobs are committed: every file is written by ``build(name, folder)`` into a
temporary folder. Each case says which command line to run, which exit code and which words
the one-line error must show, which output must not appear, which files must stay unchanged,
and (for pickles that would run code) which marker file must never be created.

Run as a script to write the whole corpus into a folder: ``python tests/hostile_corpus.py DIR``.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from onnx import numpy_helper
from torch import nn

from helpers.corpus_files import (  # noqa: E402,F401  (re-exported for the tests)
    SHAPE,
    TINYNET,
    Case,
    Evil,
    convert,
    factory,
    onnx_case,
    onnx_conv_model,
    onnx_file,
    save,
    shape_case,
    tiny_module,
    tiny_state_dict,
    tinynet_file,
    weights_case,
    write_bytes,
)


# ----------------------------------------------------------------------------- the cases
def _zip_checkpoint(folder: Path) -> Path:
    return save(folder, "good.pth", tiny_state_dict(folder))


def c_random_pth(f):
    return weights_case(f, write_bytes(f, "random.pth", os.urandom(4096)), "not a readable")


def c_random_safetensors(f):
    return weights_case(f, write_bytes(f, "random.safetensors", os.urandom(4096)), "safetensors")


def c_empty_pth(f):
    return weights_case(f, write_bytes(f, "empty.pth", b""), "empty")


def c_empty_safetensors(f):
    return weights_case(f, write_bytes(f, "empty.safetensors", b""), "empty")


def c_truncated_pth(f):
    data = _zip_checkpoint(f).read_bytes()
    return weights_case(f, write_bytes(f, "trunc.pth", data[: len(data) // 2]), "trunc.pth")


def c_truncated_legacy_pth(f):
    path = save(f, "legacy.pth", tiny_state_dict(f), _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    return weights_case(f, write_bytes(f, "trunc_legacy.pth", data[: len(data) // 3]),
                        "trunc_legacy.pth")


def c_truncated_safetensors(f):
    from safetensors.torch import save_file

    save_file(tiny_state_dict(f), f / "full.safetensors")
    data = (f / "full.safetensors").read_bytes()
    return weights_case(f, write_bytes(f, "trunc.safetensors", data[: len(data) - 100]),
                        "safetensors")


def c_evil_checkpoint(f):
    marker = f / "PWNED_checkpoint"
    path = save(f, "evil.pth", {"stem.0.weight": torch.zeros(1), "payload": Evil(marker)})
    case = weights_case(f, path, "refused to unpickle", "--trust-pickle")
    case.marker = marker
    return case


def c_evil_legacy_checkpoint(f):
    marker = f / "PWNED_legacy"
    path = save(f, "evil_legacy.pt", {"payload": Evil(marker)},
                _use_new_zipfile_serialization=False)
    case = weights_case(f, path, "refused to unpickle")
    case.marker = marker
    return case


def c_evil_model_file(f):
    marker = f / "PWNED_model"
    path = save(f, "evil_model.pt", Evil(marker))
    return Case(convert(f, str(path)), 2, ("pickled", "--trust-pickle"), f / "out.onnx",
                {path: path.read_bytes()}, marker)


def c_model_pickle_without_trust(f):
    path = save(f, "whole_model.pt", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    return Case(convert(f, str(path)), 2, ("pickled", "--trust-pickle"), f / "out.onnx",
                {path: path.read_bytes()})


def c_pt2_without_trust(f):
    path = write_bytes(f, "program.pt2", b"PK\x05\x06" + b"\0" * 18)
    return Case(convert(f, str(path)), 2, (".pt2", "--trust-pickle"), f / "out.onnx",
                {path: path.read_bytes()})


def c_state_dict_as_model(f):
    path = _zip_checkpoint(f)
    return Case(convert(f, str(path)), 2, ("not a model", "--weights"), f / "out.onnx",
                {path: path.read_bytes()})


def c_safetensors_as_model(f):
    from safetensors.torch import save_file

    path = f / "weights.safetensors"
    save_file(tiny_state_dict(f), path)
    return Case(convert(f, str(path)), 2, ("weights file", "--weights"), f / "out.onnx",
                {path: path.read_bytes()})


def c_other_architecture(f):
    path = save(f, "other.pth", tiny_state_dict(f, "build_other"))
    return weights_case(f, path, "does not match", "missing", "unexpected")


def c_misshaped_weights(f):
    path = save(f, "wide.pth", tiny_state_dict(f, "build_wide"))
    return weights_case(f, path, "mis-shaped")


def c_no_tensors(f):
    return weights_case(f, save(f, "meta.pth", {"epoch": 3, "optimizer": {"lr": 0.1}}),
                        "found no weights")


def c_nan_weights(f):
    sd = tiny_state_dict(f)
    sd["block.dense.0.weight"][0, 0, 0, 0] = float("nan")
    return weights_case(f, save(f, "nan.pth", {"state_dict": sd}), "block.dense.0.weight", "nan")


def c_inf_weights(f):
    sd = tiny_state_dict(f)
    sd["head.weight"][1, 2] = float("inf")
    return weights_case(f, save(f, "inf.pth", sd), "head.weight", "infinite")


def c_nan_running_mean(f):
    sd = tiny_state_dict(f)
    sd["block.skip.running_mean"][3] = float("nan")
    return weights_case(f, save(f, "nan_mean.pth", sd), "block.skip.running_mean")


def c_bn_zero_var_zero_eps(f):
    sd = tiny_state_dict(f)
    sd["block.one.1.running_var"][2] = 0.0
    path = save(f, "zero_var.pth", sd)
    return Case(convert(f, "--factory", factory(f, "build_eps0"), "--weights", str(path)), 2,
                ("block.one.1", "running_var + eps", "eps=0"), f / "out.onnx",
                {path: path.read_bytes()})


def c_bn_negative_var(f):
    sd = tiny_state_dict(f)
    sd["block.skip.running_var"][:3] = -0.5
    return weights_case(f, save(f, "neg_var.pth", sd), "block.skip", "running_var is negative")


def c_safetensors_absurd_shape(f):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                               "data_offsets": [0, 16]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 16
    return weights_case(f, write_bytes(f, "absurd.safetensors", data), "safetensors")


def c_pth_absurd_shape(f):
    path = save(f, "absurd.pth", {"w": torch.zeros(4)}, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    # The (legacy, unzipped) pickle stores the tensor's size as a tuple (4,): make it enormous.
    i = data.find(b"K\x04\x85")
    assert i > 0
    data[i:i + 3] = b"J\xff\xff\xff\x7f\x85"
    return weights_case(f, write_bytes(f, "absurd_shape.pth", bytes(data)), "absurd_shape.pth")


def c_invalid_onnx(f):
    return onnx_case(f, write_bytes(f, "garbage.onnx", os.urandom(2048)), "not a valid onnx")


def c_empty_onnx(f):
    return onnx_case(f, write_bytes(f, "empty.onnx", b""), "empty")


def c_onnx_checker(f):
    return onnx_case(f, onnx_file(f, "ssa.onnx", onnx_conv_model(duplicate_output=True)),
                     "ssa.onnx", "checker")


def c_onnx_missing_initializer(f):
    return onnx_case(f, onnx_file(f, "noinit.onnx", onnx_conv_model(w_initializer=False)),
                     "'w'", "missing initializer")


def c_onnx_external_outside(f):
    (f.parent / "secret.bin").write_bytes(b"\0" * 324)
    path = onnx_file(f, "escape.onnx", onnx_conv_model(external="../secret.bin"))
    return onnx_case(f, path, "../secret.bin", "folder")


def c_onnx_external_absolute(f):
    path = onnx_file(f, "abs.onnx", onnx_conv_model(external="/etc/passwd"))
    return onnx_case(f, path, "/etc/passwd")


def c_onnx_external_missing(f):
    path = onnx_file(f, "nodata.onnx", onnx_conv_model(external="weights.bin"))
    return onnx_case(f, path, "weights.bin", "does not exist")


def c_onnx_absurd_shape(f):
    path = onnx_file(f, "huge.onnx", onnx_conv_model(input_dims=(1 << 20, 3, 1 << 20, 1 << 20)))
    return onnx_case(f, path, "huge.onnx", "not a real model input")


def c_onnx_ir_too_new(f):
    path = onnx_file(f, "future.onnx", onnx_conv_model(ir_version=99))
    return onnx_case(f, path, "future.onnx", "ir_version 99")


def c_onnx_nan_initializer(f):
    model = onnx_conv_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = float("nan")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    return onnx_case(f, onnx_file(f, "nan.onnx", model), "'W'", "NaN")


def c_onnx_to_pt(f):
    path = onnx_file(f, "fine.onnx", onnx_conv_model())
    return onnx_case(f, path, ".pt", "only be written as .onnx", out="out.pt")


def c_onnx_with_weights(f):
    path = onnx_file(f, "fine.onnx", onnx_conv_model())
    weights = _zip_checkpoint(f)
    return Case(convert(f, str(path), "--weights", str(weights), shape=None), 2,
                ("--weights", "onnx"), f / "out.onnx")


def c_shape_letters(f):
    return shape_case(f, "1,3,a,b", "not a shape")


def c_shape_zero(f):
    return shape_case(f, "0,3,16,16", "zero")


def c_shape_negative(f):
    return shape_case(f, "1,3,-16,16", "not a shape")


def c_shape_huge(f):
    return shape_case(f, "1,3,60000,60000", "too large")


def c_shape_empty(f):
    return shape_case(f, "", "not a shape")


def c_shape_rank(f):
    return shape_case(f, "7", "dimensions")


def c_shape_wrong_channels(f):
    return Case(convert(f, "--factory", factory(f), shape="1,5,16,16"), 2,
                ("1,5,16,16", "--input-shape"), f / "out.onnx")


def c_output_is_weights(f):
    path = _zip_checkpoint(f)
    args = ["convert", "--factory", factory(f), "--weights", str(path), "-o", str(path),
            "--force", "--input-shape", SHAPE]
    return Case(args, 2, ("input file",), None, {path: path.read_bytes()})


def c_output_is_model(f):
    path = onnx_file(f, "model.onnx", onnx_conv_model())
    return Case(["convert", str(path), "-o", str(path), "--force"], 2, ("input file",), None,
                {path: path.read_bytes()})


def c_output_links_to_input(f):
    path = _zip_checkpoint(f)
    link = f / "link.pt"
    link.symlink_to(path)
    args = ["convert", "--factory", factory(f), "--weights", str(path), "-o", str(link),
            "--force", "--input-shape", SHAPE]
    return Case(args, 2, ("input file",), None, {path: path.read_bytes()})


def c_output_exists(f):
    out = write_bytes(f, "out.onnx", b"precious")
    return Case(convert(f, "--factory", factory(f)), 2, ("already exists", "--force"), None,
                {out: b"precious"})


def c_output_unknown_suffix(f):
    return Case(convert(f, "--factory", factory(f), out="out.txt"), 2, ("unknown format",),
                f / "out.txt")


def c_output_is_directory(f):
    (f / "adir.onnx").mkdir()
    return Case(convert(f, "--factory", factory(f), out="adir.onnx"), 2, ("directory",), None)


def c_output_parent_is_file(f):
    (f / "plain.txt").write_text("a file")
    return Case(convert(f, "--factory", factory(f), out="plain.txt/sub/out.onnx"), 2,
                ("plain.txt", "not a directory"), f / "plain.txt" / "sub" / "out.onnx")


def c_json_is_output(f):
    args = convert(f, "--factory", factory(f)) + ["--json", str(f / "out.onnx")]
    return Case(args, 2, ("--json",), f / "out.onnx")


def c_two_sources(f):
    return Case(convert(f, "--factory", factory(f), "--timm", "resnet18"), 2,
                ("only one",), f / "out.onnx")


def c_no_source(f):
    return Case(convert(f), 2, ("give a model",), f / "out.onnx")


def c_unknown_arch(f):
    return Case(convert(f, "--arch", "repvgg_a9"), 2, ("unknown architecture", "repvgg_a"),
                f / "out.onnx")


def c_unknown_timm(f):
    return Case(convert(f, "--timm", "resnet_nonexistent_42"), 2, ("unknown timm model",),
                f / "out.onnx")


def c_factory_missing_attr(f):
    return Case(convert(f, "--factory", factory(f, "biuld")), 2, ("no attribute", "build"),
                f / "out.onnx")


def c_factory_raises(f):
    return Case(convert(f, "--factory", factory(f, "broken")), 2, ("factory exploded",),
                f / "out.onnx")


def c_factory_not_module(f):
    return Case(convert(f, "--factory", factory(f, "not_a_module")), 2, ("not an nn.module",),
                f / "out.onnx")


def c_factory_bad_syntax(f):
    return Case(convert(f, "--factory", "no_colon_here"), 2, ("module:callable",),
                f / "out.onnx")


def c_bad_tol(f):
    return Case(convert(f, "--factory", factory(f), "--tol", "tiny"), 2, ("--tol",),
                f / "out.onnx")


def c_tol_too_tight(f):
    return Case(convert(f, "--factory", factory(f), "--tol", "1e-30"), 1,
                ("verification failed", "nothing written"), f / "out.onnx")


def c_missing_weights_file(f):
    return Case(convert(f, "--factory", factory(f), "--weights", str(f / "nope.pth")), 2,
                ("nope.pth", "does not exist"), f / "out.onnx")


def c_verify_mismatch(f):
    a = save(f, "a.pth", tiny_state_dict(f))
    sd = tiny_state_dict(f)
    sd["block.dense.0.weight"] *= 1.01
    b = save(f, "b.pth", sd)
    spec = f"factory:{factory(f)}"
    return Case(["verify", spec, spec, "--reference-weights", str(a), "--candidate-weights",
                 str(b), "--input-shape", SHAPE], 1, ("differs", "max abs"), None,
                {a: a.read_bytes(), b: b.read_bytes()})


CASES: dict[str, Callable[[Path], Case]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


def build(name: str, folder: Path) -> Case:
    """Write the files of case ``name`` into ``folder`` and return the case."""
    folder.mkdir(parents=True, exist_ok=True)
    return CASES[name](folder)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for case_name in CASES:
        c = build(case_name, root / case_name)
        print(f"{case_name}: repfuse {' '.join(c.args)}  -> exit {c.code}")
