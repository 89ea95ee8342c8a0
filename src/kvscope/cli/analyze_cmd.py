"""`kvscope analyze TRACE...`: run detectors and report their findings."""

from __future__ import annotations

import click

from kvscope.errors import EXIT_FINDINGS, EXIT_OK


@click.command("analyze")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
@click.option("--detector", "-d", "detectors", multiple=True, metavar="NAME",
              help="Run only this detector (repeatable); default: all registered detectors.")
@click.option("--set", "overrides", multiple=True, metavar="DETECTOR.FIELD=VALUE",
              help="Override one threshold, e.g. --set growth_curve.ratio_threshold=1.5 (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True)
@click.option("--fail-on", type=click.Choice(["warning", "critical"]), default=None,
              help="Exit with code 1 when a finding of this severity or worse exists (a CI gate).")
@click.option("--threads", type=int, default=None, help="DuckDB threads (default: all cores).")
def analyze_command(traces: tuple[str, ...], detectors: tuple[str, ...], overrides: tuple[str, ...], fmt: str,
                    fail_on: str | None, threads: int | None) -> int:
    """Run the detectors over one trace, several, or folders of traces.

    Exits 0 normally, 1 when --fail-on matched a finding, 2 for bad input.
    """
    from kvscope.analyzer.analyze import analyze
    from kvscope.analyzer.load import load_traces
    from kvscope.analyzer.registry import parse_overrides, select
    from kvscope.analyzer.report import print_table, to_json, to_markdown

    chosen = select(detectors)
    configs = parse_overrides(overrides, chosen)
    with load_traces(traces, threads=threads, progress=fmt == "text") as tables:
        findings = analyze(tables, chosen, configs)
    if fmt == "json":
        click.echo(to_json(findings))
    elif fmt == "markdown":
        click.echo(to_markdown(findings))
    else:
        print_table(findings)
    if fail_on is not None and any(f.at_least(fail_on) for f in findings):
        return EXIT_FINDINGS
    return EXIT_OK
