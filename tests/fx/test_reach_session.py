"""``fx.reach`` runs the model once inside one torch.fx patching session: every unit it
traces (modules called from untraced Python: ultralytics' layer loop) shares the session's
patches of ``nn.Module.__call__`` / ``__getattr__``, which are set once, pass real calls
through unchanged and are put back however the run ends; fx's tracing flag reads False in
the model's real code and True while a unit is traced."""

from __future__ import annotations

import pytest
import torch
import torch.fx._symbolic_trace as fx_symbolic
from torch import nn

import repfuse
from repfuse.fx import fuse as fx_fuse
from repfuse.fx.reach import reach
from repfuse.fx.trace import META


class _Unit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.flags: list[bool] = []

    def forward(self, x):
        self.flags.append(fx_symbolic.is_fx_tracing())
        return torch.relu(self.bn(self.conv(x)) + x)


class _Loop(nn.Module):
    """A root that fx cannot trace (data-dependent Python), calling its units in a loop,
    as ultralytics' ``_predict_once`` does."""

    def __init__(self, n: int = 5, c: int = 4) -> None:
        super().__init__()
        self.units = nn.ModuleList(_Unit(c) for _ in range(n))
        self.flags: list[bool] = []
        self.hooked = 0
        self.units[2].conv.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.hooked += 1

    def forward(self, x):
        self.flags.append(fx_symbolic.is_fx_tracing())
        for unit in self.units:
            if float(x.detach().abs().sum()) >= 0:      # data-dependent: not traceable
                x = unit(x)
        return x


def _count_module_patches(monkeypatch) -> list[str]:
    patched: list[str] = []
    real = fx_symbolic._Patcher.patch_method

    def counting(self, cls, name, new_fn, deduplicate=True):
        if cls is nn.Module:
            patched.append(name)
        return real(self, cls, name, new_fn, deduplicate)
    monkeypatch.setattr(fx_symbolic._Patcher, "patch_method", counting)
    return patched


def test_one_patching_session_for_every_unit(monkeypatch):
    patched = _count_module_patches(monkeypatch)
    model = _Loop().eval()
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    found = reach(model, (torch.randn(1, 4, 6, 6),), fx_fuse._capture)
    traced = [u for u in found.units.values() if u.graph is not None]
    assert len(traced) == 5 and found.graph(model) is None     # five units, opaque root
    assert sorted(patched) == ["__call__", "__getattr__"]        # once each, not per unit
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_


def test_real_code_sees_no_tracing_and_its_hooks_run():
    model = _Loop().eval()
    x = torch.randn(1, 4, 6, 6)
    reach(model, (x,))
    assert model.flags == [True, False]      # its trace (which fails), then its real run
    # each unit: traced once (flag True), then run through its graph (its Python does
    # not run again); the hooked conv's hook ran in the real run
    assert all(u.flags == [True] for u in model.units)
    assert model.hooked == 1


def test_patches_are_put_back_when_the_model_raises():
    class Failing(_Loop):
        def forward(self, x):
            x = super().forward(x)
            raise ValueError("boom")

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    with pytest.raises(ValueError, match="boom"):
        reach(Failing().eval(), (torch.randn(1, 4, 6, 6),))
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert not fx_symbolic.is_fx_tracing()


def test_a_looped_model_fuses_and_verifies():
    torch.manual_seed(0)
    model = _Loop().eval()
    x = torch.randn(1, 4, 8, 8)
    result = repfuse.fuse(model, x)
    fused = {r.path for r in result.report.fused}
    assert result.report.ok and len(fused) == 4 and "units.2.conv" not in fused
    assert any("hooks" in r.reason for r in result.report.regions if r not in
               result.report.fused)                               # the hooked conv: kept
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_another_threads_modules_run_as_they_are_while_a_unit_is_traced():
    """fx's patches are process-wide: a module called from another thread while a unit is
    being traced runs on its real values instead of entering the trace."""
    import threading

    other = nn.Conv2d(2, 2, 1).eval()
    z = torch.randn(1, 2, 3, 3)
    results: list = []

    class Spawning(_Unit):
        def forward(self, x):
            def work():
                try:
                    results.append(other(z))
                except Exception as err:  # noqa: BLE001 - recorded for the assertion
                    results.append(err)
            t = threading.Thread(target=work)
            t.start()
            t.join()
            return super().forward(x)

    model = _Loop(n=3)
    model.units[0] = Spawning(4)
    model.eval()
    reach(model, (torch.randn(1, 4, 6, 6),))
    assert results and all(isinstance(r, torch.Tensor) for r in results), results
    with torch.no_grad():
        torch.testing.assert_close(results[0], other(z))


def test_the_tracing_flag_on_torch_versions_without_a_thread_local_one(monkeypatch):
    from repfuse.fx import trace

    monkeypatch.delattr(fx_symbolic, "_get_is_fx_tracing")
    monkeypatch.delattr(fx_symbolic, "_set_is_fx_tracing")
    monkeypatch.setattr(fx_symbolic, "_is_fx_tracing_flag", True, raising=False)
    with trace._fx_tracing(False):
        assert fx_symbolic._is_fx_tracing_flag is False
    assert fx_symbolic._is_fx_tracing_flag is True
    monkeypatch.delattr(fx_symbolic, "_is_fx_tracing_flag")
    with trace._fx_tracing(False):      # no flag at all: nothing to set, no error
        pass


# ---------------------------------------------------------------------- the graph runner
class _Star(nn.Module):
    """A forward of variable arguments."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, *xs):
        return self.conv(xs[0]) + xs[1]


class _Optional(nn.Module):
    """A parameter with a default, left out by one caller and passed by another."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, scale: float = 2.0):
        return self.bn(self.conv(x)) * scale


class _Callers(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.star, self.plain, self.scaled = _Star(c), _Optional(c), _Optional(c)

    def forward(self, x):
        y = self.star(x, x)
        return (self.plain(y) + self.scaled(y, 3.0)).flatten(1).sum(1)


def test_graphs_run_with_their_defaults_and_record_their_values():
    """Every traced unit runs through its graph on the real values (the model's output is
    reproduced exactly), the others run their own Python, and every module call and output
    of every graph that ran has the shape of its value recorded."""
    torch.manual_seed(0)
    model = _Callers().eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
    out: list = []
    model.register_forward_hook(lambda m, a, o: out.append(o))
    found = reach(model, (x,))
    assert torch.equal(out[-1], want)
    graphs = {u.path: u.graph for k, u in found.units.items()
              if u.graph is not None and k not in found.unplain}
    # (``star`` has no placeholder for ``*xs`` and ``scaled`` was traced with its default:
    # called with two arguments, each runs its own Python, and its layers are reached so)
    assert {"", "plain"} <= graphs.keys()
    assert {id(model.star), id(model.scaled)} <= found.unplain
    assert {id(model.star.conv), id(model.scaled.bn)} <= found.ran
    for path, graph in graphs.items():
        for n in graph.nodes:
            if n.op in ("call_module", "output"):     # (tensors here; guards are not)
                assert META in n.meta, (path, n.name)


def test_a_failing_graph_node_is_named():
    """An error raised while a graph runs says which node of which unit raised it."""
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv(x) + x       # shapes differ at run time, not while tracing

    with pytest.raises(RuntimeError) as err:
        reach(nn.Sequential(Bad()), (torch.randn(1, 4, 5, 5),))
    if hasattr(err.value, "add_note"):
        assert "while running" in " ".join(getattr(err.value, "__notes__", []))
        assert "of 0" in " ".join(err.value.__notes__)
