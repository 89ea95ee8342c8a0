"""`kvscope compact TRACE...`: merge each table's parts into one, repair interrupted compactions."""

from __future__ import annotations

import click

from kvscope.errors import EXIT_OK


@click.command("compact")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
def compact_command(traces: tuple[str, ...]) -> int:
    """Merge a trace's part files (what a crashed recording leaves) into one sorted part per table.

    Also finishes or undoes an interrupted compaction and removes stray temporary parts. Every
    intermediate state reads the same to kvscope, DuckDB and pyarrow; it is safe to run again.
    """
    from kvscope.trace.compact import compact_trace
    from kvscope.trace.reader import find_traces
    from kvscope.trace.text import clean

    for path in find_traces(list(traces)):
        done = compact_trace(path)
        click.echo(f"{clean(path, 400)}: " + ("; ".join(done) if done else "nothing to do"))
    return EXIT_OK
