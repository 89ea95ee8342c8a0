"""`kvscope export TRACE --perfetto|--prometheus`: the trace for Perfetto, or metrics for Prometheus."""

from __future__ import annotations

import json

import click

from kvscope.cli.console import check_output_file, write_output_file
from kvscope.errors import EXIT_OK, UsageError


@click.command("export")
@click.argument("traces", nargs=-1, type=click.Path())
@click.option("--perfetto", "fmt", flag_value="perfetto",
              help="Chrome trace-event JSON (ui.perfetto.dev, chrome://tracing): memory and KV counters, "
                   "generation and step slices, OOMs and markers; µs since the run started.")
@click.option("--prometheus", "fmt", flag_value="prometheus",
              help="Prometheus text exposition (a node exporter's textfile collector): last readings, peaks, "
                   "retention and finding counts.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The file to write (default: standard output).")
@click.option("--threads", type=int, default=None, help="DuckDB threads (default: all cores).")
def export_command(traces: tuple[str, ...], fmt: str | None, output: str | None, threads: int | None) -> int:
    """Export traces as Perfetto / Chrome trace-event JSON or as Prometheus metrics."""
    from kvscope.analyzer.analyze import analyze
    from kvscope.analyzer.export import perfetto_trace, prometheus_text
    from kvscope.analyzer.load import load_traces

    if not traces:
        raise UsageError("give at least one trace (or a folder of traces) to export.")
    if fmt is None:
        raise UsageError("say what to export: --perfetto or --prometheus.")
    if output is not None:
        check_output_file(output)
    with load_traces(traces, threads=threads) as tables:
        if fmt == "perfetto":
            text = json.dumps(perfetto_trace(tables), separators=(",", ":"), allow_nan=False) + "\n"
        else:
            text = prometheus_text(tables, analyze(tables))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_output_file(output, text)
        click.echo(f"wrote {output}" + (" (open it in ui.perfetto.dev)" if fmt == "perfetto" else ""), err=True)
    return EXIT_OK
