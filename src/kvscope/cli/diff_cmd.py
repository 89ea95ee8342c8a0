"""`kvscope diff A B`: what changed between two traces."""

from __future__ import annotations

import json
from typing import Any

import click

from kvscope.cli.console import stdout_console
from kvscope.errors import EXIT_OK


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
def diff_command(a: str, b: str, fmt: str, min_severity: str, no_validate: bool) -> int:
    """Compare trace A (before) with trace B (after): layers, peaks, retention, fragmentation, findings."""
    from kvscope.analyzer.diff import compare
    from kvscope.analyzer.load import load_traces

    with load_traces([a], validate=not no_validate) as ta, load_traces([b], validate=not no_validate) as tb:
        result = compare(ta, tb, min_severity)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        _print(result, a, b)
    return EXIT_OK
