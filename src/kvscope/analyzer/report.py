"""Reporters: findings as a rich table, JSON or Markdown (detectors only return data)."""

from __future__ import annotations

import json
from typing import Any

from kvscope.analyzer.findings import Finding

_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}


def _fmt_value(x: float | None) -> str:
    if x is None:
        return "-"
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.4g}"


def _fmt_opt(x: int | None) -> str:
    return "-" if x is None else str(x)


def to_json(findings: list[Finding]) -> str:
    """One JSON array; each element has the Findings fields plus `evidence`."""
    return json.dumps([f.to_dict() for f in findings], indent=2, allow_nan=False)


def to_markdown(findings: list[Finding]) -> str:
    lines = ["| severity | detector | run | gen | layer | metric | value | threshold | message |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        cells = [f.severity, f.detector, f.run_id, _fmt_opt(f.gen_id), _fmt_opt(f.layer), f.metric,
                 _fmt_value(f.value), _fmt_value(f.threshold), f.message.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    if not findings:
        lines.append("| - | - | - | - | - | - | - | - | no findings |")
    return "\n".join(lines)


def summary_line(findings: list[Finding]) -> str:
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("critical", "warning", "info")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def print_table(findings: list[Finding], console: Any | None = None, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_lines=False, expand=False)
    for header, justify in (("severity", "left"), ("detector", "left"), ("run", "left"), ("gen", "right"),
                            ("layer", "right"), ("metric", "left"), ("value", "right"),
                            ("threshold", "right"), ("message", "left")):
        table.add_column(header, justify=justify, overflow="fold",  # type: ignore[arg-type]
                         no_wrap=header != "message", ratio=1 if header == "message" else None)
    for f in findings:
        table.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.detector, f.run_id, _fmt_opt(f.gen_id),
                      _fmt_opt(f.layer), f.metric, _fmt_value(f.value), _fmt_value(f.threshold), f.message)
    console.print(table)
    console.print(f"{len(findings)} finding(s): {summary_line(findings)}", highlight=False)
