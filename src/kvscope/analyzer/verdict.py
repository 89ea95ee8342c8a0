"""The verdict of a run: what the findings and the trace's own numbers say, in five aspects.

`kvscope.analyzer.run_facts` reads the few numbers a verdict needs that no finding carries (a
healthy cache yields no growth finding, low fragmentation none): bytes per token, fragmentation,
memory beside the cache, retention per cause. `build_verdict(findings, facts)` is a pure function of those and the
detectors' findings: per run, the KV cache (healthy linear / saturating windows / static /
superlinear), retention after generation (none / warm-up / leak, with its cause), fragmentation
(ratio and bytes), memory outside the cache and the OOM forecast; then the findings that need
action, grouped, and the info findings collapsed (the same finding on several generations is one
group with the range of generations and values). The five aspects are built in
`kvscope.analyzer.aspects`; reporters (`kvscope.analyzer.report`, `html_report`) format the verdict.

Findings are read by detector name and metric only, and any finding of a detector the verdict does
not know still lands in its groups, so new detectors and metrics need no change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvscope.analyzer.aspects import ASPECT_TITLES, ASPECTS, STATUSES, Aspect, aspect_of, run_aspects, run_context
from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import SEVERITY_RANK, Finding, sort_findings, span_text
from kvscope.analyzer.run_facts import RunFacts, run_facts

__all__ = ["ASPECTS", "ASPECT_TITLES", "STATUSES", "Aspect", "FindingGroup", "RunVerdict", "Verdict", "aspect_of",
           "build_verdict", "group_findings", "run_verdict", "verdict_of"]


@dataclass(frozen=True)
class FindingGroup:
    """Findings of one detector, metric, severity and layer on one run, merged across generations."""

    detector: str
    severity: str
    run_id: str
    metric: str
    layer: int | None
    gen_ids: tuple[int, ...]  # the generations, sorted; empty for a whole-run finding
    count: int
    value_min: float
    value_max: float
    threshold: float | None
    message: str  # the message of the most extreme finding of the group
    aspect: str | None

    @property
    def generations_text(self) -> str:
        return span_text(self.gen_ids)


@dataclass(frozen=True)
class RunVerdict:
    run_id: str
    model_name: str
    trace: str | None
    severity: str  # the worst finding's severity, "info" when nothing needs action
    headline: str  # "healthy" or what needs action, in a few words
    context: str  # "4 generations, 24 layers, up to 255 tokens"
    aspects: tuple[Aspect, ...]
    action: tuple[FindingGroup, ...]  # warning and critical groups, most severe first
    info: tuple[FindingGroup, ...]  # info groups
    counts: dict[str, int] = field(default_factory=dict)  # findings per severity
    facts: RunFacts | None = None  # the numbers the aspects quote

    @property
    def healthy(self) -> bool:
        return not self.action

    def aspect(self, name: str) -> Aspect | None:
        return next((a for a in self.aspects if a.name == name), None)

    def one_line(self) -> str:
        """The run in one line, for a folder of traces."""
        parts = [f"{a.title} {a.label}" for a in self.aspects if a.status != "n/a"]
        return f"{self.headline}: " + "; ".join(parts)


@dataclass(frozen=True)
class Verdict:
    """The verdict over every run analysed, most serious run first."""

    runs: tuple[RunVerdict, ...]

    @property
    def worst(self) -> RunVerdict | None:
        return self.runs[0] if self.runs else None

    @property
    def severity(self) -> str:
        return self.runs[0].severity if self.runs else "info"

    def run(self, run_id: str) -> RunVerdict:
        return next(r for r in self.runs if r.run_id == run_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"severity", "worst_run", "runs": [...]} with every field of every run."""
        runs = []
        for r in self.runs:
            row = asdict(r)
            row["aspects"] = {a.name: {"status": a.status, "label": a.label, "text": a.text} for a in r.aspects}
            runs.append(row)
        return {"severity": self.severity, "worst_run": self.worst.run_id if self.worst else None, "runs": runs}


# --- grouping ----------------------------------------------------------------------------------

def group_findings(findings: Sequence[Finding]) -> list[FindingGroup]:
    """One group per (run, detector, severity, metric, layer): the same finding on several generations."""
    buckets: dict[tuple[Any, ...], list[Finding]] = {}
    for f in sort_findings(list(findings)):
        buckets.setdefault((f.run_id, f.detector, f.severity, f.metric, f.layer), []).append(f)
    groups = []
    for (run_id, detector, severity, metric, layer), fs in buckets.items():
        values = [f.value for f in fs]
        extreme = max(fs, key=lambda f: abs(f.value))
        gens = tuple(sorted({f.gen_id for f in fs if f.gen_id is not None}))
        groups.append(FindingGroup(detector, severity, run_id, metric, layer, gens, len(fs), min(values),
                                   max(values), extreme.threshold, extreme.message, aspect_of(fs[0])))
    groups.sort(key=lambda g: (-SEVERITY_RANK[g.severity], g.run_id, ASPECTS.index(g.aspect) if g.aspect in ASPECTS
                               else len(ASPECTS), g.detector, g.metric, -1 if g.layer is None else g.layer))
    return groups


def run_verdict(facts: RunFacts, findings: Sequence[Finding]) -> RunVerdict:
    fs = [f for f in findings if f.run_id == facts.run_id]
    aspects = run_aspects(facts, fs)
    groups = group_findings(fs)
    action = tuple(g for g in groups if g.severity != "info")
    info = tuple(g for g in groups if g.severity == "info")
    worst = max((f.rank for f in fs), default=0)
    severity = ("info", "warning", "critical")[worst]
    # what needs action, the most serious first (critical before warning, then in aspect order)
    serious = sorted((a for a in aspects if a.status in ("warning", "critical")), key=lambda a: a.status != "critical")
    if serious:
        headline = ", ".join(f"{a.title}: {a.label}" for a in serious)
    elif action:
        headline = ", ".join(dict.fromkeys(f"{g.detector} {g.severity}" for g in action))
    else:
        headline = "healthy"
    counts = {s: sum(1 for f in fs if f.severity == s) for s in ("critical", "warning", "info")}
    return RunVerdict(facts.run_id, facts.model_name, facts.trace, severity, headline, run_context(facts), aspects,
                      action, info, counts, facts)


def build_verdict(findings: Sequence[Finding], facts: Sequence[RunFacts]) -> Verdict:
    """The verdict of each run (a pure function of the findings and the runs' facts), worst run first.

    Findings of runs without facts (a detector reporting on a run the trace's tables lack) get a
    verdict from the findings alone.
    """
    known = {f.run_id for f in facts}
    all_facts = list(facts) + [RunFacts(run_id, "?") for run_id in sorted({f.run_id for f in findings} - known)]
    runs = [run_verdict(f, findings) for f in all_facts]
    runs.sort(key=lambda r: (-SEVERITY_RANK[r.severity], -len(r.action), r.model_name, r.run_id))
    return Verdict(tuple(runs))


def verdict_of(tables: Engine, findings: Sequence[Finding]) -> Verdict:
    """The verdict of loaded traces and their findings."""
    return build_verdict(findings, run_facts(tables))
