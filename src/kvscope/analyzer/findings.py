"""What a detector returns: findings, as plain data (reporters format them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}
# The fields every finding has, in the order reporters print them (trace-format.md, "Findings").
FINDING_FIELDS = ("detector", "severity", "run_id", "gen_id", "layer", "metric", "value", "threshold", "message")


def _number(x: Any) -> float | None:
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


def _plain(x: Any) -> Any:
    """Evidence values as JSON-ready Python values (no numpy scalars, no NaN/inf)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Decimal):
        return _plain(float(x))
    if hasattr(x, "item"):  # numpy scalar
        return _plain(x.item())
    return str(x)


@dataclass(frozen=True)
class Finding:
    """One observation of a detector about a run, a generation or a layer."""

    detector: str
    severity: str  # info | warning | critical
    run_id: str
    gen_id: int | None
    layer: int | None
    metric: str
    value: float
    threshold: float | None
    message: str  # one sentence a person can act on
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {self.severity!r}")
        value = _number(self.value)
        object.__setattr__(self, "value", 0.0 if value is None else value)
        object.__setattr__(self, "threshold", _number(self.threshold))
        object.__setattr__(self, "gen_id", None if self.gen_id is None else int(self.gen_id))
        object.__setattr__(self, "layer", None if self.layer is None else int(self.layer))
        object.__setattr__(self, "evidence", _plain(dict(self.evidence)))

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    def at_least(self, severity: str) -> bool:
        return self.rank >= SEVERITY_RANK[severity]

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {name: getattr(self, name) for name in FINDING_FIELDS}
        row["evidence"] = self.evidence
        return row

    def sort_key(self) -> tuple[Any, ...]:
        return (-self.rank, self.run_id, self.detector,
                -1 if self.gen_id is None else self.gen_id, -1 if self.layer is None else self.layer, self.metric)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first, then by run, detector, generation and layer."""
    return sorted(findings, key=Finding.sort_key)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def bytes_in_unit_of(n: float, largest: float) -> str:
    """`n` in the unit human_bytes picks for `largest`, so that sizes compare at a glance."""
    unit, scale = "B", 1.0
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if abs(largest) < 1024 * scale:
            break
        unit, scale = name, scale * 1024
    return f"{n:.0f} B" if unit == "B" else f"{n / scale:.2f} {unit}"


def layer_list(layers: list[int], limit: int = 8) -> str:
    """`0, 2, 4` or `0, 2, 4, ... (18 layers)` for a message."""
    shown = ", ".join(str(i) for i in layers[:limit])
    return shown if len(layers) <= limit else f"{shown}, ... ({len(layers)} layers)"


# --- small formatting helpers shared by the verdict and the reporters ----------------------------

def span_text(ids: Sequence[int]) -> str:
    """`0-3`, `0, 2-4`: sorted integers as ranges."""
    out: list[str] = []
    ids = sorted(set(ids))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def number_text(x: float | None) -> str:
    """A number in full, never cut: 413,773 / 8,192 / 0.885 / 2.68."""
    if x is None:
        return "-"
    if abs(x) >= 100 or float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:.3g}"


def metric_value_text(metric: str, x: float | None) -> str:
    """A finding's value in its unit: bytes as KiB/MiB, fractions as percent, counts in full."""
    if x is None:
        return "-"
    m = metric.lower()
    if m.endswith("bytes") or "bytes_per" in m:
        return human_bytes(x)
    if any(w in m for w in ("retention", "fragmentation", "fraction")) and abs(x) <= 1.5:
        return f"{x:.0%}" if abs(x) >= 0.01 else f"{x:.1%}"
    return number_text(x)
