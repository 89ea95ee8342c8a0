"""Reporters: the verdict as text, findings as JSON or Markdown (detectors only return data)."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from kvscope.analyzer.findings import Finding, metric_value_text
from kvscope.analyzer.verdict import FindingGroup, RunVerdict, Verdict


def _fmt_value(x: float | None) -> str:
    if x is None:
        return "-"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _fmt_opt(x: int | None) -> str:
    return "-" if x is None else str(x)


def to_json(findings: list[Finding]) -> str:
    """One JSON array; each element has the Findings fields plus `evidence`."""
    return json.dumps([f.to_dict() for f in findings], indent=2, allow_nan=False)


def to_json_verdict(findings: list[Finding], verdict: Verdict) -> str:
    """One JSON object: {"verdict": {...}, "findings": [...]} (`--format json-verdict`)."""
    return json.dumps({"verdict": verdict.to_dict(), "findings": [f.to_dict() for f in findings]}, indent=2,
                      allow_nan=False)


def to_markdown(findings: list[Finding]) -> str:
    lines = ["| severity | detector | run | gen | layer | metric | value | threshold | message |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        cells = [f.severity, f.detector, f.run_id, _fmt_opt(f.gen_id), _fmt_opt(f.layer), f.metric,
                 _fmt_value(f.value), _fmt_value(f.threshold), f.message.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    if not findings:
        return "No findings."
    return "\n".join(lines)


def summary_line(findings: list[Finding]) -> str:
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("critical", "warning", "info")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


# --- the verdict as plain text (80 columns and up, a pipe, a terminal) -------------------------

LABEL_WIDTH = 14
STATUS_WIDTH = 9
SEVERITY_WORD = {"info": "info", "warning": "WARNING", "critical": "CRITICAL"}


# A number and its unit stay on one line: joined by a no-break space while wrapping.
_UNIT = re.compile(r"(\d) (B|KiB|MiB|GiB|TiB|tokens?|layers?|generations?)\b")


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    """`text` wrapped to `width` columns, the first line after `first`, the others after `rest`."""
    lines = textwrap.wrap(_UNIT.sub("\\1\u00a0\\2", text), width=max(width, len(first) + 20), initial_indent=first,
                          subsequent_indent=rest, break_long_words=True, break_on_hyphens=False)
    return [line.replace("\u00a0", " ") for line in lines] or [first.rstrip()]


def _columns(label: str, status: str, text: str, width: int, indent: int = 2) -> list[str]:
    """A label, a status word and a wrapped sentence; below 60 columns the sentence goes under the label."""
    if width < 60:
        head = f"{' ' * indent}{label}: {status}"
        return [head] + _wrap(text, width, " " * (indent + 2), " " * (indent + 2))
    first = f"{' ' * indent}{label:<{LABEL_WIDTH}} {status:<{STATUS_WIDTH}}"
    return _wrap(text, width, first, " " * len(first))


def _group_head(g: FindingGroup) -> str:
    value = metric_value_text(g.metric, g.value_min)
    if g.value_max != g.value_min:
        value = f"{value} to {metric_value_text(g.metric, g.value_max)}"
    where = []
    if g.layer is not None:
        where.append(f"layer {g.layer}")
    if g.gen_ids:
        where.append(f"generation{'s' if len(g.gen_ids) > 1 else ''} {g.generations_text}")
    else:
        where.append("whole run")
    return f"{g.detector} {g.metric} {value}, {', '.join(where)}"


def _run_name(r: RunVerdict) -> str:
    """The trace's folder name (what tells runs of one folder apart), else the run id."""
    return Path(r.trace).name if r.trace else r.run_id


def _shown_path(path: str) -> str:
    """A trace path relative to the working directory when it lies below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def run_block(r: RunVerdict, width: int = 80, min_severity: str = "info") -> list[str]:
    """One run's verdict: a header, the five aspects, what needs action, the info collapsed."""
    status = "healthy" if r.headline == "healthy" else f"{SEVERITY_WORD[r.severity]}: {r.headline}"
    lines = _wrap(f"{r.model_name}, run {r.run_id}: {status}", width, "", "  ")
    lines += _wrap(r.context, width, "  ", "  ")
    if r.trace:
        lines += _wrap(f"trace {_shown_path(r.trace)}", width, "  ", "    ")
    for a in r.aspects:
        lines += _columns(a.title, a.status, a.text, width)
    rank = {"info": 0, "warning": 1, "critical": 2}[min_severity]
    action = [g for g in r.action if {"warning": 1, "critical": 2}[g.severity] >= rank]
    if action:
        lines.append(f"  needs action ({len(action)}):")
        for g in action:
            lines += _wrap(_group_head(g), width, f"    {SEVERITY_WORD[g.severity]:<9}", " " * 13)
            lines += _wrap(g.message, width, " " * 13, " " * 13)
    elif not r.action:
        lines.append("  needs action: nothing")
    if r.info and rank == 0:
        n = sum(g.count for g in r.info)
        lines.append(f"  for information ({n} finding{'s' if n != 1 else ''} in {len(r.info)} "
                     f"group{'s' if len(r.info) != 1 else ''}):")
        for g in r.info:
            lines += _wrap(_group_head(g), width, "    ", "      ")
    return lines


def verdict_text(verdict: Verdict, width: int = 80, min_severity: str = "info") -> str:
    """The verdict as plain text: one run's block, or one line per run and then the worst run's block."""
    if not verdict.runs:
        return "No runs in the traces."
    if len(verdict.runs) == 1:
        return "\n".join(run_block(verdict.runs[0], width, min_severity))
    runs = verdict.runs
    healthy = sum(1 for r in runs if r.headline == "healthy")
    head = f"{len(runs)} runs: " + ", ".join(
        f"{n} {word}" for word, n in (("critical", sum(r.severity == "critical" for r in runs)),
                                      ("warning", sum(r.severity == "warning" for r in runs)),
                                      ("healthy", healthy)) if n)
    lines = [head]
    for r in runs:
        word = "ok" if r.headline == "healthy" else SEVERITY_WORD[r.severity]
        lines += _wrap(f"{_run_name(r)}: {r.one_line()}", width, f"  {word:<9}", " " * 13)
    worst = verdict.worst
    assert worst is not None
    lines.append("")
    lines.append("worst run:" if worst.headline != "healthy" else "first run (all healthy):")
    lines += run_block(worst, width, min_severity)
    return "\n".join(lines)


def print_verdict(verdict: Verdict, findings: list[Finding], console: Any | None = None,
                  min_severity: str = "info") -> None:
    """Print the verdict at the console's width (a pipe: uncoloured), then the count of findings."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    text = Text(verdict_text(verdict, console.width, min_severity) + "\n"
                f"{len(findings)} finding(s): {summary_line(findings)}")
    text.highlight_words(["CRITICAL"], "bold red")
    text.highlight_words(["WARNING", " warning "], "yellow")
    text.highlight_words([": healthy", " ok "], "green")
    console.print(text, highlight=False, soft_wrap=True)
