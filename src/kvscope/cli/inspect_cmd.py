"""`kvscope inspect TRACE...`: format, metadata, row counts, size and the invariant check."""

from __future__ import annotations

import json

import click

from kvscope.cli.console import stdout_console
from kvscope.errors import EXIT_BAD_INPUT, EXIT_OK, TraceError
from kvscope.trace.text import clean as clean_text


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_report(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from kvscope.trace.text import markup as m

    console = stdout_console()
    status = "[green]valid[/green]" if report["valid"] else "[red]INVALID[/red]"
    console.print(f"[bold]{m(report['path'], 400)}[/bold]  format {m(', '.join(report['format_versions']))}  {status}",
                  highlight=False)
    for run in report["runs"]:
        console.print(
            f"  run {m(run.get('run_id'))}: {m(run.get('model_name'))} ({m(run.get('model_type'))}, "
            f"{m(run.get('num_layers'))} layers, {m(run.get('dtype'))}) on {m(run.get('device'))}"
            + (f" \\[{m(run.get('gpu_name'))}]" if run.get("gpu_name") else ""),
            highlight=False,
        )
        console.print(
            f"    torch {m(run.get('torch_version') or '-')}, transformers {m(run.get('transformers_version') or '-')}, "
            f"kvscope {m(run.get('kvscope_version'))}, started {m(run.get('started_at'))} on {m(run.get('host'))}",
            highlight=False,
        )
        if run.get("labels"):
            console.print(f"    labels {m(run['labels'], 400)}", highlight=False)
    table = Table(title=None, show_edge=False)
    for header in ("table", "rows", "parts", "size", "bytes/row"):
        table.add_column(header, justify="left" if header == "table" else "right")
    for name, info in report["tables"].items():
        bpr = "-" if info["bytes_per_row"] is None else f"{info['bytes_per_row']:.2f}"
        table.add_row(name, f"{info['rows']:,}", str(info["parts"]), _human(info["size_bytes"]), bpr)
    console.print(table)
    console.print(f"  total size on disk: {_human(report['size_bytes'])}")
    for error in report["errors"]:
        console.print(Text.assemble("  ", ("error:", "red"), " ", Text(clean_text(error, 1000))), highlight=False)
    for warning in report["warnings"]:
        console.print(Text.assemble("  ", ("warning:", "yellow"), " ", Text(clean_text(warning, 1000))),
                      highlight=False)


@click.command("inspect")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def inspect_command(traces: tuple[str, ...], fmt: str) -> int:
    """Show a trace's format, run metadata, row counts, size on disk and invariant check.

    Exits 0 when every trace is valid, 2 when one is not.
    """
    from kvscope.trace.inspect import inspect_trace
    from kvscope.trace.reader import find_traces

    paths = find_traces(list(traces))
    reports: list[dict] = []
    unreadable = 0
    for path in paths:
        if len(paths) == 1:
            reports.append(inspect_trace(path))  # a TraceError is the command's one-line error
            continue
        try:  # a folder of traces: report one that cannot be opened and go on with the others
            reports.append(inspect_trace(path))
        except TraceError as exc:
            unreadable += 1
            click.echo(f"kvscope: error: {exc}", err=True)
    if fmt == "json":
        click.echo(json.dumps(reports[0] if len(paths) == 1 else reports, indent=2, default=str))
    else:
        for report in reports:
            _print_report(report)
    if unreadable or not all(r["valid"] for r in reports):
        if fmt == "text" and not all(r["valid"] for r in reports):
            click.echo("kvscope: error: the trace breaks the format's invariants (listed above).", err=True)
        return EXIT_BAD_INPUT
    return EXIT_OK
