"""`kvscope diff A B`: what changed between two traces."""

from __future__ import annotations

import json
from typing import Any

import click

from kvscope.cli.console import stdout_console
from kvscope.errors import EXIT_FINDINGS, EXIT_OK, UsageError


def _num(x: Any, kind: str = "") -> str:
    if x is None:
        return "-"
    if kind == "pct":
        return f"{x:+.1%}"
    if kind == "frac":
        return f"{x:.3f}"
    from kvscope.analyzer.findings import human_bytes

    return human_bytes(x)


def _print(result: dict[str, Any], a: str, b: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from kvscope.trace.text import clean

    console = stdout_console()
    layers = Table(title=Text(f"bytes per token per layer: A={clean(a, 300)}  B={clean(b, 300)}"), show_edge=False)
    for header in ("layer", "type", "A", "B", "change"):
        layers.add_column(header, justify="left" if header == "type" else "right")
    for row in result["layers"]:
        style = "yellow" if row["change"] not in (None, 0) and abs(row["change"]) > 0.01 else None
        layers.add_row(Text(clean(row["layer"])), Text(clean(row["layer_type"] or "-")), _num(row["a"]),
                       _num(row["b"]), _num(row["change"], "pct"), style=style)
    console.print(layers)
    metrics = Table(title="memory", show_edge=False)
    for header in ("metric", "A", "B", "change"):
        metrics.add_column(header, justify="left" if header == "metric" else "right")
    for row in result["metrics"]:
        kind = "frac" if "fragmentation" in row["metric"] or "retention" in row["metric"] else ""
        metrics.add_row(Text(clean(row["metric"])), _num(row["a"], kind), _num(row["b"], kind),
                        _num(row["change"], "pct"))
    console.print(metrics)
    for side, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        for f in result[side]:
            where = f" layer {f['layer']}" if f["layer"] is not None else ""
            console.print(Text.assemble((f"{label}:", "bold"), " ", clean(
                f"{f['severity']} {f['detector']} {f['metric']}{where}: {f['message']}", 1000)), highlight=False)
    if not result["only_in_a"] and not result["only_in_b"]:
        console.print("the same warning and critical findings in both.")


@click.command("diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--min-severity", type=click.Choice(["info", "warning", "critical"]), default="warning",
              show_default=True, help="Findings compared: this severity or worse.")
@click.option("--no-validate", is_flag=True, help="Skip the checks of `kvscope inspect` (faster on big traces).")
@click.option("--fail-on", type=click.Choice(["warning", "critical"]), default=None,
              help="Exit 1 when B has a finding of this severity or worse that A has not (a CI gate on regressions).")
def diff_command(a: str, b: str, fmt: str, min_severity: str, no_validate: bool, fail_on: str | None) -> int:
    """Compare trace A (before) with trace B (after): layers, peaks, retention, fragmentation, findings.

    Exits 0, or 1 with --fail-on when B brings a new finding at that severity or worse; 2 for bad input.
    """
    from kvscope.analyzer.findings import SEVERITY_RANK

    if fail_on is not None and SEVERITY_RANK[fail_on] < SEVERITY_RANK[min_severity]:
        raise UsageError(f"--fail-on {fail_on} is below --min-severity {min_severity}: those findings are not "
                         "compared; lower --min-severity.")
    from kvscope.analyzer.diff import compare
    from kvscope.analyzer.load import load_traces

    with load_traces([a], validate=not no_validate) as ta, load_traces([b], validate=not no_validate) as tb:
        result = compare(ta, tb, min_severity)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        _print(result, a, b)
    if fail_on is not None:
        new = [f for f in result["only_in_b"] if SEVERITY_RANK[f["severity"]] >= SEVERITY_RANK[fail_on]]
        if new:
            click.echo(f"kvscope diff: {len(new)} new {fail_on}-or-worse finding(s) in B "
                       f"({', '.join(sorted({f['detector'] for f in new}))})", err=True)
            return EXIT_FINDINGS
    return EXIT_OK
