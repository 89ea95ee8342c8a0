"""`kvscope report TRACE... -o report.html`: the verdict, the findings and their charts in one HTML file."""

from __future__ import annotations

import click

from kvscope.cli.console import check_output_file, write_output_file
from kvscope.errors import EXIT_OK, UsageError


@click.command("report")
@click.argument("traces", nargs=-1, type=click.Path())
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="The HTML file to write (one self-contained file: opens with no network).")
@click.option("--detector", "-d", "detectors", multiple=True, metavar="NAME",
              help="Run only this detector (repeatable); default: all registered detectors.")
@click.option("--set", "overrides", multiple=True, metavar="DETECTOR.FIELD=VALUE",
              help="Override one threshold, e.g. --set post_eos.live_threshold=0.2 (repeatable).")
@click.option("--title", default="KVScope report", show_default=True, help="The page's title.")
@click.option("--threads", type=int, default=None, help="DuckDB threads (default: all cores).")
def report_command(traces: tuple[str, ...], output: str, detectors: tuple[str, ...], overrides: tuple[str, ...],
                   title: str, threads: int | None) -> int:
    """Write one self-contained HTML report: the verdict and findings first, each linked to its chart.

    Charts: KV bytes against tokens per layer with the fit, device memory over time with generation
    boundaries, per-generation readings and retention by cause, bytes per token per layer against the
    geometry, head statistics where present; for several runs, a comparison table.
    """
    from kvscope.analyzer.analyze import analyze
    from kvscope.analyzer.html_report import build_report
    from kvscope.analyzer.load import load_traces
    from kvscope.analyzer.registry import parse_overrides, select
    from kvscope.analyzer.verdict import verdict_of

    if not traces:
        raise UsageError("give at least one trace (or a folder of traces) to report on.")
    out = check_output_file(output)
    chosen = select(detectors)
    configs = parse_overrides(overrides, chosen)
    with load_traces(traces, threads=threads) as tables:
        findings = analyze(tables, chosen, configs)
        verdict = verdict_of(tables, findings)
        page = build_report(tables, findings, verdict, title)
    write_output_file(out, page)
    runs = len(verdict.runs)
    click.echo(f"wrote {out} ({len(page.encode()) / (1 << 20):.1f} MiB, {runs} run{'s' if runs != 1 else ''}, "
               f"{len(findings)} finding(s)); open it in a browser, no network needed.", err=True)
    return EXIT_OK
