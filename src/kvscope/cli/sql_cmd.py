"""`kvscope sql TRACE... "SELECT ..."`: DuckDB SQL over a trace's views."""

from __future__ import annotations

import click

from kvscope.cli.console import check_output_file, engine_options, write_output_file
from kvscope.errors import EXIT_OK, UsageError


@click.command("sql")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the result to this file (required for parquet).")
@click.option("--limit", type=int, default=1000, show_default=True,
              help="Rows shown by --format table (the others write every row).")
@click.option("--unsafe", is_flag=True,
              help="Plain DuckDB: any statement, any file, extensions, settings. Only for your own traces on "
                   "your own machine; by default one read-only query that reads only the traces given.")
@click.option("--no-validate", is_flag=True, help="Skip the checks of `kvscope inspect` (faster on big traces).")
@engine_options
def sql_command(traces: tuple[str, ...], query: str, fmt: str, output: str | None, limit: int, unsafe: bool,
                no_validate: bool, engine: str = "duckdb", master: str | None = None) -> int:
    """Run one SQL query over the views run, generations, steps, layers, events, kv_samples, head_stats.

    The query is one read-only statement that can read only the traces given (no other file, no
    network, no extension, no setting); --unsafe lifts this. The query is DuckDB SQL; with
    --engine spark it is translated to Spark SQL (sqlglot) and may read only the trace views.
    """
    from kvscope.analyzer.sql import run_query

    if not traces:
        raise UsageError("give at least one trace before the query.")
    if fmt == "parquet" and output is None:
        raise UsageError("--format parquet needs -o FILE.")
    if output is not None:
        check_output_file(output)
    text = run_query(list(traces), query, fmt, output, limit, unsafe=unsafe, validate=not no_validate,
                     engine=engine, master=master)
    if text is not None:
        if output is not None:
            write_output_file(output, text)
        else:
            click.echo(text, nl=not text.endswith("\n"))
    return EXIT_OK
