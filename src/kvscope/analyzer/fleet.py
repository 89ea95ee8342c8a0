"""Fleet views: runs grouped by host, model, transformers version or a run label, worst first.

`fleet_view(engine, by)` runs the detectors (measure on the engine, judge here), builds each run's
verdict, and groups the runs by the values of `by` (metadata columns of `run`, or keys of its
`labels` JSON): per group, how many runs need action and for what, the live-tensor bytes retained
after generations (the leak's size), the nearest OOM forecast, and since when (the first run in
the group that needs action). Groups are ranked by their worst finding, then by how many runs
need action, then by retained bytes. A pure function of findings, facts and run metadata
(`group_runs`) does the grouping, so both engines give the same view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from kvscope.analyzer.analyze import analyze
from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import SEVERITY_RANK, Finding
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.run_facts import RunFacts, run_facts
from kvscope.analyzer.untrusted import json_object
from kvscope.analyzer.verdict import build_verdict

# `--by` names of run metadata columns; any other name is a key of run.labels.
METADATA = {"host": "host", "model": "model_name", "model_type": "model_type", "transformers": "transformers_version",
            "torch": "torch_version", "gpu": "gpu_name", "device": "device", "dtype": "dtype"}
NONE = "(none)"


@dataclass(frozen=True)
class RunMeta:
    """The run metadata a fleet groups by."""

    run_id: str
    values: dict[str, str]  # metadata column or label key -> value
    started_at: str | None  # ISO 8601, UTC


@dataclass(frozen=True)
class FleetGroup:
    """One group of runs (e.g. one host) and what its runs' findings say."""

    key: tuple[str, ...]  # the values of `by`, in order
    runs: int
    critical_runs: int
    warning_runs: int
    severity: str  # the worst finding's ("info" when no run needs action)
    detectors: dict[str, int]  # runs with a warning or critical finding, per detector
    retained_live_bytes: int  # live tensors left after generations, summed over runs and generations
    min_tokens_to_oom: float | None  # the nearest oom_forecast over the group's runs
    oom_runs: int  # runs that ran out of memory (oom_event or OOM events)
    first_action: str | None  # started_at of the first run that needs action
    last_action: str | None
    worst_runs: tuple[str, ...]  # run ids needing action, worst first (at most 5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Fleet:
    by: tuple[str, ...]
    groups: tuple[FleetGroup, ...]
    runs: int
    findings: int

    def to_dict(self) -> dict[str, Any]:
        return {"by": list(self.by), "runs": self.runs, "findings": self.findings,
                "groups": [g.to_dict() for g in self.groups]}


def _iso(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None if value is None else str(value)
    if value.tzinfo is not None:  # DuckDB gives aware datetimes, Spark naive ones in the session's UTC
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value.isoformat()


def run_meta(t: Engine, by: Sequence[str]) -> list[RunMeta]:
    """The `by` values of every run (metadata columns, else run.labels keys)."""
    columns = sorted({METADATA[b] for b in by if b in METADATA})
    select = ", ".join(["run_id", "labels", "started_at", *columns])
    out = []
    for r in t.records(f"SELECT {select} FROM run ORDER BY run_id"):
        labels = json_object(r["labels"])
        values = {}
        for b in by:
            raw = r.get(METADATA[b]) if b in METADATA else labels.get(b)
            values[b] = NONE if raw is None or raw == "" else str(raw)
        out.append(RunMeta(str(r["run_id"]), values, _iso(r["started_at"])))
    return out


def group_runs(by: Sequence[str], meta: Sequence[RunMeta], findings: Sequence[Finding],
               facts: Sequence[RunFacts]) -> Fleet:
    """The fleet view: a pure function of run metadata, findings and run facts."""
    verdict = build_verdict(findings, facts)
    by_run = {r.run_id: r for r in verdict.runs}
    fact_of = {f.run_id: f for f in facts}
    members: dict[tuple[str, ...], list[RunMeta]] = {}
    for m in meta:
        members.setdefault(tuple(m.values[b] for b in by), []).append(m)
    groups = []
    for key, runs in members.items():
        ids = {m.run_id for m in runs}
        mine = [f for f in findings if f.run_id in ids]
        action = [f for f in mine if f.at_least("warning")]
        severity = max((f.severity for f in mine), key=lambda s: SEVERITY_RANK[s], default="info")
        detectors: dict[str, set[str]] = {}
        for f in action:
            detectors.setdefault(f.detector, set()).add(f.run_id)
        needing = [m for m in runs if by_run.get(m.run_id) is not None and not by_run[m.run_id].healthy]
        started = sorted(m.started_at for m in needing if m.started_at)
        forecasts = [f.value for f in mine if f.detector == "oom_forecast" and f.metric == "tokens_to_oom"]
        worst = sorted(needing, key=lambda m: (-SEVERITY_RANK[by_run[m.run_id].severity],
                                               -len(by_run[m.run_id].action), m.run_id))
        groups.append(FleetGroup(
            key=key, runs=len(runs),
            critical_runs=sum(1 for m in runs if m.run_id in by_run and by_run[m.run_id].severity == "critical"),
            warning_runs=sum(1 for m in runs if m.run_id in by_run and by_run[m.run_id].severity == "warning"),
            severity=severity, detectors={d: len(r) for d, r in sorted(detectors.items())},
            retained_live_bytes=sum(max(g.live_bytes or 0, 0) for m in runs if m.run_id in fact_of
                                    for g in fact_of[m.run_id].retention),
            min_tokens_to_oom=min(forecasts) if forecasts else None,
            oom_runs=sum(1 for m in runs if (m.run_id in fact_of and fact_of[m.run_id].oom_events)
                         or any(f.run_id == m.run_id and f.detector == "oom_event" and f.severity == "critical"
                                for f in action)),
            first_action=started[0] if started else None, last_action=started[-1] if started else None,
            worst_runs=tuple(m.run_id for m in worst[:5]),
        ))
    groups.sort(key=lambda g: (-SEVERITY_RANK[g.severity], -g.critical_runs, -g.warning_runs,
                               -g.retained_live_bytes, g.key))
    return Fleet(tuple(by), tuple(groups), len(meta), len(findings))


def fleet_view(t: Engine, by: Sequence[str], detectors: Sequence[Detector] | None = None,
               configs: Mapping[str, Any] | None = None) -> Fleet:
    """Run the detectors over the engine's traces and group the runs by `by` (see the module)."""
    findings = analyze(t, list(detectors) if detectors else None, configs)
    return group_runs(by, run_meta(t, by), findings, run_facts(t))
