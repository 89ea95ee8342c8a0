"""`kvscope fleet TRACES... --by host`: runs grouped by metadata or a label, worst groups first."""

from __future__ import annotations

import json

import click

from kvscope.cli.console import engine_options, human_bytes, stdout_console
from kvscope.errors import EXIT_BAD_INPUT, EXIT_OK, UsageError


@click.command("fleet")
@click.argument("traces", nargs=-1, type=click.Path())
@click.option("--by", "by", multiple=True, metavar="KEY",
              help="Group by host, model, model_type, transformers, torch, gpu, device, dtype, or a run label key "
                   "(e.g. variant); repeatable for a combined key. Default: host.")
@click.option("--detector", "-d", "detectors", multiple=True, metavar="NAME",
              help="Run only this detector (repeatable); default: all registered detectors.")
@click.option("--set", "overrides", multiple=True, metavar="DETECTOR.FIELD=VALUE",
              help="Override one threshold (repeatable), as for kvscope analyze.")
@click.option("--top", type=int, default=20, show_default=True, help="Groups shown by --format text.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--no-validate", is_flag=True, help="Skip the checks of `kvscope inspect` (faster on big fleets).")
@click.option("--skip-bad", is_flag=True, help="Report an invalid trace and go on with the others (exit 2 at the end).")
@engine_options
def fleet_command(traces: tuple[str, ...], by: tuple[str, ...], detectors: tuple[str, ...],
                  overrides: tuple[str, ...], top: int, fmt: str, no_validate: bool, skip_bad: bool,
                  engine: str, master: str | None) -> int:
    """Which hosts, models or versions leak, fragment or run out, and since when: the runs of many
    traces grouped by KEY, ranked by their worst findings, retained bytes and OOM forecasts."""
    from kvscope.analyzer.engine import open_engine
    from kvscope.analyzer.fleet import fleet_view
    from kvscope.analyzer.registry import parse_overrides, select

    if not traces:
        raise UsageError("give at least one trace (or a folder of traces).")
    if top < 1:
        raise UsageError(f"--top must be at least 1, not {top}.")
    keys = tuple(dict.fromkeys(by or ("host",)))
    chosen = select(detectors)
    configs = parse_overrides(overrides, chosen)
    with open_engine(traces, engine=engine, master=master, progress=fmt == "text", validate=not no_validate,
                     skip_bad=skip_bad) as tables:
        view = fleet_view(tables, keys, chosen, configs)
        skipped = tables.skipped
    for _path, problem in skipped:
        click.echo(f"kvscope: error: skipped: {problem}", err=True)
    if fmt == "json":
        click.echo(json.dumps(view.to_dict(), indent=2))
    else:
        _print(view, top)
    return EXIT_BAD_INPUT if skipped else EXIT_OK


def _print(view: object, top: int) -> None:
    from rich.table import Table
    from rich.text import Text

    from kvscope.analyzer.fleet import Fleet
    from kvscope.trace.text import clean

    assert isinstance(view, Fleet)
    table = Table(title=f"{view.runs} runs by {' / '.join(view.by)}, worst first", show_edge=False)
    for header in (*view.by, "runs", "critical", "warning", "worst", "detectors (runs)", "retained live",
                   "nearest OOM", "needs action since"):
        table.add_column(header, justify="right" if header in ("runs", "critical", "warning") else "left",
                         overflow="fold")
    for g in view.groups[:top]:
        dets = ", ".join(f"{d} {n}" for d, n in g.detectors.items()) or "-"
        oom = f"{g.min_tokens_to_oom:,.0f} tokens" if g.min_tokens_to_oom is not None else "-"
        if g.oom_runs:
            oom = f"ran out ({g.oom_runs} runs)"
        table.add_row(*(Text(clean(k, 60)) for k in g.key), str(g.runs), str(g.critical_runs), str(g.warning_runs),
                      g.severity, Text(dets), human_bytes(g.retained_live_bytes) if g.retained_live_bytes else "-",
                      oom, g.first_action or "-")
    console = stdout_console()
    console.print(table)
    if len(view.groups) > top:
        console.print(f"{len(view.groups) - top} more group(s); --top or --format json shows them.", highlight=False)
