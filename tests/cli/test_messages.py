"""CLI messages that name the real cause, and exit codes 0/1/2 that hold with --debug."""

from __future__ import annotations

import pickle
import textwrap

import pytest
import torch
from click.testing import CliRunner

import repfuse
from repfuse.cli.main import cli
from repfuse.errors import VerificationError

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn(self.a(x) + self.b(x)))


    class EvalOnly(Net):
        """Runs only in eval mode, as detection heads that decode boxes at inference do."""

        def forward(self, x):
            if self.training:
                raise RuntimeError("this model runs only in eval mode")
            return super().forward(x)


    def build():
        return Net()


    def build_eval_only():
        return EvalOnly()
''')
SHAPE = "1,3,12,12"


def run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, [str(a) for a in args])


@pytest.fixture
def netfile(tmp_path, monkeypatch):
    path = tmp_path / "trustnet.py"
    path.write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["model.pkl", "model.pt"])
def test_plain_pickled_module_names_the_flag(netfile, tmp_path, name):
    """A whole module written with pickle.dump (not torch.save): without --trust-pickle the
    message names the flag and the class the file would import; with it, it converts."""
    import trustnet

    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(trustnet.build().eval(), f)
    out = tmp_path / "out.pt"
    result = run("convert", path, "--input-shape", SHAPE, "-o", out)
    assert result.exit_code == 2, result.output + result.stderr
    line = _error_line(result)
    assert "--trust-pickle" in line and "trustnet.Net" in line, line
    assert "corrupt" not in line
    assert not out.exists()
    result = run("convert", path, "--trust-pickle", "--input-shape", SHAPE, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert out.exists()


def test_factory_that_runs_only_in_eval_mode(netfile, tmp_path):
    out = tmp_path / "out.pt"
    result = run("convert", "--factory", f"{netfile}:build_eval_only", "--input-shape", SHAPE,
                 "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert out.exists()


def test_factory_whose_batch_norms_fail_in_training_mode(tmp_path):
    """A model that fails with its batch norms in training mode gets a message about the
    calibration of random weights and --weights, not about --input-shape."""
    path = tmp_path / "bnfail.py"
    path.write_text(NET + textwrap.dedent('''
        class NoTrainBN(Net):
            def forward(self, x):
                if self.bn.training:
                    raise RuntimeError("batch statistics are not supported here")
                return super().forward(x)


        def build_no_train_bn():
            return NoTrainBN()
    '''))
    result = run("convert", "--factory", f"{path}:build_no_train_bn", "--input-shape", SHAPE,
                 "-o", tmp_path / "o.pt")
    assert result.exit_code == 2, result.output + result.stderr
    line = _error_line(result)
    assert "--weights" in line and "--input-shape" not in line, line


def test_debug_keeps_exit_codes(tmp_path, monkeypatch):
    """--debug shows the traceback; a bad input still exits 2, a failed verification 1."""
    for args in (["--debug", "convert"], ["convert", "--debug"]):
        result = run(*args, "--arch", "no_such_arch", "-o", tmp_path / "o.pt")
        assert result.exit_code == 2, result.output + result.stderr
        assert "Traceback" in result.stderr and "no_such_arch" in result.stderr

    def failing(*a, **k):
        raise VerificationError("the fused model disagrees (planted)")

    monkeypatch.setattr(repfuse, "fuse", failing)
    result = run("--debug", "convert", "--arch", "repvgg_a0", "--input-shape", "1,3,32,32",
                 "-o", tmp_path / "o.pt")
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" in result.stderr and "planted" in result.stderr
    assert not (tmp_path / "o.pt").exists()
    monkeypatch.undo()
    assert torch.is_grad_enabled()
