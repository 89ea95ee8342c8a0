"""`kvscope tune TRACES... --labels labels.csv --detector NAME --param FIELD --range a:b:step`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from kvscope.cli.console import engine_options, stdout_console
from kvscope.errors import EXIT_OK, UsageError

if TYPE_CHECKING:  # the analyser (duckdb) is imported inside the command only
    from kvscope.analyzer.tune import TuneRow


@click.command("tune")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
@click.option("--labels", "labels_path", required=True, type=click.Path(),
              help="CSV with columns run_id, expected (1/0) and optionally gen_id, detector.")
@click.option("--detector", "-d", "detector_name", required=True, metavar="NAME")
@click.option("--param", required=True, metavar="FIELD", help="The config field to sweep.")
@click.option("--range", "value_range", required=True, metavar="A:B:STEP", help="Values to try, B included.")
@click.option("--set", "overrides", multiple=True, metavar="DETECTOR.FIELD=VALUE",
              help="Fix other thresholds of the detector (repeatable).")
@click.option("--min-severity", type=click.Choice(["info", "warning", "critical"]), default="warning",
              show_default=True, help="Findings at or above this count as the detector saying 'present'.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--no-validate", is_flag=True, help="Skip the checks of `kvscope inspect` (faster on big traces).")
@engine_options
def tune_command(traces: tuple[str, ...], labels_path: str, detector_name: str, param: str, value_range: str,
                 overrides: tuple[str, ...], min_severity: str, fmt: str, no_validate: bool, engine: str = "duckdb",
                 master: str | None = None) -> int:
    """Sweep one threshold over labelled traces; print precision, recall and F1 per value, the best marked."""
    from kvscope.analyzer.engine import open_engine
    from kvscope.analyzer.registry import field_types, get_detector, parse_overrides
    from kvscope.analyzer.tune import parse_range, read_labels, sweep

    detector = get_detector(detector_name)
    base = parse_overrides(overrides, [detector])[detector.name]
    kinds = field_types(type(base))
    if param not in kinds:
        raise UsageError(f"--param {param!r}: {detector.name} has no such threshold; fields are {', '.join(kinds)}.")
    if kinds[param] not in (int, float):
        raise UsageError(f"--param {param!r} is not numeric ({kinds[param]}), so it cannot be swept.")
    values = parse_range(value_range, kinds[param])
    labels = read_labels(labels_path, detector.name)
    with open_engine(traces, engine=engine, master=master, progress=fmt == "text",
                     validate=not no_validate) as tables:
        if fmt == "text":
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task(f"{detector.name}.{param}", total=len(values))
                rows = sweep(tables, detector, base, param, values, labels, min_severity,
                             on_value=lambda _v: progress.advance(task))
        else:
            rows = sweep(tables, detector, base, param, values, labels, min_severity)
    if fmt == "json":
        click.echo(json.dumps({"detector": detector.name, "param": param, "labels": len(labels),
                               "changes_nothing": _changes_nothing(rows), "rows": [r.to_dict() for r in rows]},
                              indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{detector.name}.{param} over {len(labels)} labels", show_edge=False)
    for header in ("", param, "tp", "fp", "fn", "tn", "precision", "recall", "F1"):
        table.add_column(header, justify="right")
    for r in rows:
        value = f"{int(r.value)}" if kinds[param] is int else f"{r.value:g}"
        table.add_row("*" if r.best else "", value, str(r.tp), str(r.fp), str(r.fn), str(r.tn),
                      f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}")
    console = stdout_console()
    console.print(table)
    best = next(r for r in rows if r.best)
    console.print(f"best: {param} = {best.value:g} (F1 {best.f1:.3f})", highlight=False)
    if _changes_nothing(rows):
        console.print(f"{detector.name}.{param} changes nothing here: every value from {rows[0].value:g} to "
                      f"{rows[-1].value:g} gives the same predictions (tp {best.tp}, fp {best.fp}, fn {best.fn}, "
                      f"tn {best.tn}); try a wider range or another threshold (kvscope analyze --list).",
                      highlight=False)
    return EXIT_OK


def _changes_nothing(rows: list[TuneRow]) -> bool:
    """Whether every swept value gave the same confusion matrix (the threshold does not matter here)."""
    return len(rows) > 1 and len({(r.tp, r.fp, r.fn, r.tn) for r in rows}) == 1
