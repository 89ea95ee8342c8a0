"""Entry point: one click group; every KvscopeError becomes its exit code here, in `_Group.invoke`.

Each command lives in its own module (`kvscope.cli.<name>_cmd`), validates its input, calls one
library function and prints the result. Heavy imports (torch, duckdb) happen inside commands so
`kvscope inspect` works on a GPU host that has neither polars nor duckdb.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from kvscope._version import __version__
from kvscope.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, KvscopeError

# (command module, attribute): adding a command is one line here.
COMMANDS = (
    ("kvscope.cli.inspect_cmd", "inspect_command"),
    ("kvscope.cli.record_cmd", "record_command"),
    ("kvscope.cli.analyze_cmd", "analyze_command"),
    ("kvscope.cli.sql_cmd", "sql_command"),
    ("kvscope.cli.tune_cmd", "tune_command"),
    ("kvscope.cli.fleet_cmd", "fleet_command"),
    ("kvscope.cli.diff_cmd", "diff_command"),
    ("kvscope.cli.kernels_cmd", "kernels_command"),
    ("kvscope.cli.compact_cmd", "compact_command"),
    ("kvscope.cli.redact_cmd", "redact_command"),
    ("kvscope.cli.lab_cmd", "lab_command"),
    ("kvscope.cli.report_cmd", "report_command"),
    ("kvscope.cli.export_cmd", "export_command"),
    ("kvscope.cli.ppl_cmd", "ppl_command"),
)


class _Group(click.Group):
    """Turns a command's returned exit code and KvscopeErrors into click exits, so that
    `click.testing.CliRunner` and the `kvscope` script see the same codes as `main()`."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            result = super().invoke(ctx)
        except KvscopeError as exc:
            click.echo(f"kvscope: error: {exc}", err=True)
            raise click.exceptions.Exit(exc.exit_code) from exc
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            raise click.exceptions.Exit(result)
        return result


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvscope")
def cli() -> None:
    """KVScope: record a model's KV cache, then analyse the trace without a GPU."""


def _register() -> None:
    import importlib

    for module_name, attr in COMMANDS:
        cli.add_command(getattr(importlib.import_module(module_name), attr))


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises for expected errors)."""
    try:
        # Commands return their exit code (e.g. 1 when --fail-on finds a finding).
        result = cli.main(args=argv, prog_name="kvscope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kvscope: aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code if exc.exit_code else EXIT_BAD_INPUT
    except Exception as exc:  # a bug, not bad input: one line for the user, the traceback on request
        if os.environ.get("KVSCOPE_DEBUG"):
            traceback.print_exc()
        click.echo(f"kvscope: internal error: {type(exc).__name__}: {exc} (set KVSCOPE_DEBUG=1 for the traceback)",
                   err=True)
        return EXIT_RUNTIME
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
