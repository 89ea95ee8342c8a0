"""`kvscope analyze TRACE...`: run detectors and report their findings."""

from __future__ import annotations

import click

from kvscope.cli.console import engine_options, stdout_console
from kvscope.errors import EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_OK, UsageError


def _list_detectors() -> None:
    import dataclasses

    from rich.table import Table

    from kvscope.analyzer.registry import registry

    table = Table(show_edge=False)
    for header in ("detector", "what it reports", "thresholds (--set detector.field=value)"):
        table.add_column(header, overflow="fold")
    for name, det in sorted(registry().items()):
        fields = ", ".join(f"{f.name}={getattr(det.default_config(), f.name)!r}"
                           for f in dataclasses.fields(det.config))
        table.add_row(name, det.summary, fields)
    stdout_console().print(table)


@click.command("analyze")
@click.argument("traces", nargs=-1, type=click.Path())
@click.option("--detector", "-d", "detectors", multiple=True, metavar="NAME",
              help="Run only this detector (repeatable); default: all registered detectors.")
@click.option("--set", "overrides", multiple=True, metavar="DETECTOR.FIELD=VALUE",
              help="Override one threshold, e.g. --set growth_curve.ratio_threshold=1.5 (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "json-verdict", "markdown"]), default="text",
              show_default=True,
              help="text: the verdict per run, the findings that need action grouped, info collapsed; "
                   "json: every finding, one JSON array (the format's contract); json-verdict: "
                   '{"verdict": ..., "findings": [...]}; markdown: every finding, one table.')
@click.option("--fail-on", type=click.Choice(["warning", "critical"]), default=None,
              help="Exit with code 1 when a finding of this severity or worse exists (a CI gate).")
@click.option("--min-severity", type=click.Choice(["info", "warning", "critical"]), default="info",
              show_default=True, help="Report only findings of this severity or worse (--fail-on sees all).")
@click.option("--threads", type=int, default=None, help="DuckDB threads (default: all cores).")
@click.option("--list", "list_only", is_flag=True, help="List the registered detectors and their thresholds.")
@click.option("--no-validate", is_flag=True, help="Skip the checks of `kvscope inspect` (faster on big traces).")
@click.option("--skip-bad", is_flag=True,
              help="Report a trace that is invalid and go on with the others (exit 2 at the end).")
@engine_options
def analyze_command(traces: tuple[str, ...], detectors: tuple[str, ...], overrides: tuple[str, ...], fmt: str,
                    fail_on: str | None, min_severity: str, threads: int | None, list_only: bool,
                    no_validate: bool = False, skip_bad: bool = False, engine: str = "duckdb",
                    master: str | None = None) -> int:
    """Run the detectors over one trace, several, or folders of traces, and give a verdict per run.

    Exits 0 normally, 1 when --fail-on matched a finding, 2 for bad input.
    """
    from kvscope.analyzer.analyze import analyze
    from kvscope.analyzer.engine import open_engine
    from kvscope.analyzer.registry import parse_overrides, select
    from kvscope.analyzer.report import print_verdict, to_json, to_json_verdict, to_markdown
    from kvscope.analyzer.verdict import verdict_of

    if list_only:
        _list_detectors()
        return EXIT_OK
    if not traces:
        raise UsageError("give at least one trace (or a folder of traces) to analyse.")
    chosen = select(detectors)
    configs = parse_overrides(overrides, chosen)
    if threads is not None and engine != "duckdb":
        raise UsageError("--threads is for --engine duckdb (Spark's parallelism is its master's).")
    with open_engine(traces, engine=engine, master=master, threads=threads, progress=fmt == "text",
                     validate=not no_validate, skip_bad=skip_bad) as tables:
        findings = analyze(tables, chosen, configs)
        verdict = verdict_of(tables, findings) if fmt in ("text", "json-verdict") else None
        skipped = tables.skipped
    for _path, problem in skipped:
        click.echo(f"kvscope: error: skipped: {problem}", err=True)
    shown = [f for f in findings if f.at_least(min_severity)]
    if fmt in ("text", "markdown"):  # trace strings reach a terminal: no escapes, bounded length
        from kvscope.trace.text import clean_strings

        shown, verdict = clean_strings(shown), clean_strings(verdict)
    if fmt == "json":
        click.echo(to_json(shown))
    elif fmt == "markdown":
        click.echo(to_markdown(shown))
    elif fmt == "json-verdict":
        assert verdict is not None
        click.echo(to_json_verdict(shown, verdict))
    else:
        assert verdict is not None
        print_verdict(verdict, shown, stdout_console(), min_severity)
    if skipped:
        return EXIT_BAD_INPUT
    if fail_on is not None and any(f.at_least(fail_on) for f in findings):
        return EXIT_FINDINGS
    return EXIT_OK
