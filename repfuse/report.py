"""Reports returned by the API. Library code never prints: the CLI renders these.

Every report has ``.ok`` and ``.to_dict()`` (JSON-serialisable).
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RegionStatus(str, enum.Enum):
    """What happened to a region (JSON: the value)."""

    FUSED = "fused"          # replaced by one layer
    SKIPPED = "skipped"      # left alone; the reason says why
    SPLIT = "split"          # refused as a whole, its parts fused (reported on their own)

    def __str__(self) -> str:
        return self.value


class LayerStatus(str, enum.Enum):
    """What happened to one conv or norm layer of the input model (JSON: the value)."""

    FUSED = "fused"              # part of a fused region
    UNCHANGED = "unchanged"      # a conv with nothing linear next to it: already inference form
    LEFT_ALONE = "left alone"    # in a region that was not fused, or a norm no region holds
    NOT_REACHED = "not reached"  # not called, or called from code repfuse could not trace

    def __str__(self) -> str:
        return self.value


@dataclass
class LayerReport:
    """One conv or normalization layer of the input model and what became of it."""

    path: str                       # module path
    kind: str                       # "conv" or "norm"
    type: str                       # its class name
    status: LayerStatus
    reason: str = ""                # why it was not fused

    def __post_init__(self) -> None:
        self.status = LayerStatus(self.status)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = LayerStatus(self.status).value
        return _clean(d)


#: ONNX op types counted as convolutions and as normalizations.
_ONNX_CONVS = ("Conv", "ConvTranspose")
_ONNX_NORMS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
               "GroupNormalization")


@dataclass
class Check:
    """One numerical comparison: ``candidate`` against ``reference``."""

    name: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return _clean(asdict(self))


@dataclass
class VerifyReport:
    """Result of ``repfuse.verify`` (or of the checks inside ``repfuse.fuse``)."""

    checks: list[Check] = field(default_factory=list)
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return _clean({"ok": self.ok, "dtype": self.dtype, "notes": self.notes,
                       "checks": [c.to_dict() for c in self.checks]})


@dataclass
class RegionReport:
    """One linear region found in a graph: fused, left alone with a reason, or (fx) split:
    refused as a whole (the reason says why and where it was cut) while its parts are
    fused and reported as regions of their own."""

    path: str                       # module path (fx) or node name (ONNX)
    branches: list[str]             # what was fused, e.g. ["conv3x3+bn", "conv1x1+bn", "bn"]
    status: RegionStatus = RegionStatus.FUSED
    reason: str = ""                # why it was skipped or split
    result: str = ""                # what it became, e.g. "conv3x3"
    params_before: int = 0
    params_after: int = 0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    cast_error: float = 0.0         # rounding error of casting the float64 result back
    sources: list[str] = field(default_factory=list)  # its ops: module paths / node names
    node: str = ""                  # ONNX: the name of the Conv it became
    proofs: VerifyReport | None = None
    layers: list[str] = field(default_factory=list)   # conv / norm layers it holds (fx)

    def __post_init__(self) -> None:
        self.status = RegionStatus(self.status)

    @property
    def ok(self) -> bool:
        return self.status is not RegionStatus.FUSED or self.proofs is None or self.proofs.ok

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "proofs"}
        d["status"] = RegionStatus(self.status).value
        d["ok"] = self.ok
        d["proofs"] = self.proofs.to_dict() if self.proofs is not None else None
        return _clean(d)


@dataclass
class FuseReport:
    """Result of ``repfuse.fuse`` / ``repfuse.fuse_onnx``."""

    regions: list[RegionReport] = field(default_factory=list)
    model_checks: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)   # ONNX: node counts by op type
    ops_after: dict[str, int] = field(default_factory=dict)
    verified: bool = False
    #: (fx) every conv and norm layer of the input model and what became of it
    layers: list[LayerReport] = field(default_factory=list)
    #: whole-model (before, after) counts of convolutions and of normalizations (fx:
    #: modules and functional calls; ONNX: read from the op counts when not set)
    convs: tuple[int, int] | None = None
    norms: tuple[int, int] | None = None
    #: the region search's work (for debugging its cost): "regions" found, region parts
    #: tried ("attempts"), and parts reduced with values ("reductions"; the others were
    #: refused by their shapes alone)
    search: dict[str, int] = field(default_factory=dict)

    @property
    def fused(self) -> list[RegionReport]:
        return [r for r in self.regions if r.status is RegionStatus.FUSED]

    @property
    def skipped(self) -> list[RegionReport]:
        """Regions left alone (not fused, not even in parts)."""
        return [r for r in self.regions if r.status is RegionStatus.SKIPPED]

    @property
    def split(self) -> list[RegionReport]:
        """Regions refused as a whole and cut into parts, which are fused."""
        return [r for r in self.regions if r.status is RegionStatus.SPLIT]

    def layers_with(self, status: LayerStatus) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status is status]

    @property
    def left_alone(self) -> int:
        """Regions left alone (a part of a refused region refused again on its own counts
        once, with it), plus the norm layers left as they are outside those regions (a
        lone batch norm, a layer norm, ...)."""
        sets = [frozenset(r.layers) for r in self.skipped]
        outer = {s for s in sets if s and not any(s < o for o in sets)}
        regions = len(outer) + sum(1 for s in sets if not s)
        in_regions = {p for r in self.skipped for p in r.layers}
        return regions + sum(
            1 for layer in self.layers_with(LayerStatus.LEFT_ALONE)
            if layer.kind == "norm" and layer.path not in in_regions)

    def counts(self) -> dict[str, tuple[int, int]]:
        """{"convs": (before, after), "norms": (before, after)} where known."""
        out = {}
        for key, mine, ops in (("convs", self.convs, _ONNX_CONVS),
                               ("norms", self.norms, _ONNX_NORMS)):
            if mine is not None:
                out[key] = tuple(mine)
            elif self.ops_before:
                out[key] = (sum(self.ops_before.get(o, 0) for o in ops),
                            sum(self.ops_after.get(o, 0) for o in ops))
        return out

    @property
    def defects(self) -> list[RegionReport]:
        """Regions left in their training form because their proof failed: defects of
        repfuse (the returned model does not contain them), to be reported."""
        return [r for r in self.regions if r.status is not RegionStatus.FUSED
                and r.proofs is not None and not r.proofs.ok]

    @property
    def ok(self) -> bool:
        regions_ok = all(r.ok for r in self.regions)
        return regions_ok and (self.model_checks is None or self.model_checks.ok)

    def note_defects(self) -> None:
        """Add the note that names the regions whose proof failed (if any)."""
        if self.defects:
            self.notes.append(
                f"{len(self.defects)} region(s) failed their proof and were left in their "
                f"training form ({', '.join(r.path for r in self.defects)}): this is a "
                "defect of repfuse, please report it with the region's figures")

    def to_dict(self) -> dict:
        counts = self.counts()
        return _clean({
            "ok": self.ok,
            "defects": [r.path for r in self.defects],
            "verified": self.verified,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "convs": counts.get("convs"),
            "norms": counts.get("norms"),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "notes": self.notes,
            "regions": [r.to_dict() for r in self.regions],
            "layers": [layer.to_dict() for layer in self.layers],
            "model_checks": self.model_checks.to_dict() if self.model_checks else None,
            "search": self.search,
        })


def proof_failed_reason(proofs: VerifyReport) -> str:
    """Why a region whose per-region proof failed was left alone: the worst check with its
    figures, and what to do."""
    worst = max(proofs.failures, key=lambda c: c.max_rel)
    return (f"per-region proof failed ({worst.name}: max abs {worst.max_abs:.3g}, max rel "
            f"{worst.max_rel:.3g}, tolerance {worst.atol:.3g} + {worst.rtol:.3g} x "
            "max|reference|); left in its training form. This is a defect of repfuse: "
            "please report it")
