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

    @property
    def ok(self) -> bool:
        regions_ok = all(r.ok for r in self.regions)
        return regions_ok and (self.model_checks is None or self.model_checks.ok)

    def to_dict(self) -> dict:
        return _clean({
            "ok": self.ok,
            "verified": self.verified,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "notes": self.notes,
            "regions": [r.to_dict() for r in self.regions],
            "model_checks": self.model_checks.to_dict() if self.model_checks else None,
        })
