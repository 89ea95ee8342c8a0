"""Rich consoles for the commands: tables stay readable when output goes to a file or a pipe."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from kvscope.errors import UsageError

# Rich falls back to 80 columns without a terminal, which squeezes the findings tables into
# truncated cells; a file or a pipe gets a wide, uncoloured table instead (COLUMNS still wins).
PIPE_WIDTH = 200


def stdout_console() -> Console:
    """The console for a command's result on standard output."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)


def human_bytes(n: float | None) -> str:
    """Bytes as B / KiB / MiB / GiB for result tables ("-" when unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    """`--label key=value` options as a dict; a malformed one is a usage error."""
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label takes key=value, got {item!r}.")
        labels[key] = value
    return labels


def engine_options(command: Any) -> Any:
    """`--engine duckdb|spark` and `--master URL`, shared by analyze, sql, tune and fleet."""
    command = click.option("--master", default=None, metavar="URL",
                           help="Spark master for --engine spark (default local[*]; e.g. spark://host:7077).")(command)
    return click.option("--engine", type=click.Choice(["duckdb", "spark"]), default="duckdb", show_default=True,
                        help="Where the measure SQL runs: DuckDB in this process, or Spark SQL "
                             "(pip install 'kvscope[spark]'); the findings are the same.")(command)


def check_output_file(output: str | os.PathLike[str]) -> Path:
    """An `-o FILE` checked before any work: not a directory, in a folder that exists and is writable."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"-o {output}: is a directory; name the file to write.")
    if not out.parent.exists():
        raise UsageError(f"-o {output}: the folder {out.parent} does not exist.")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"-o {output}: the folder {out.parent} is not writable.")
    return out


def write_output_file(output: str | os.PathLike[str], text: str) -> None:
    """Write `text` beside `output` and rename it into place (no half-written file); an error writing
    it is the user's to fix (a full disk, a read-only place), so a UsageError, not an internal one."""
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UsageError(f"-o {output}: cannot write it ({exc.strerror or exc}).") from None


def check_output_folder(output: str | os.PathLike[str]) -> None:
    """An `-o FOLDER` checked before any work: the nearest folder that exists on its path takes a new
    folder (tried with a probe folder, removed at once: permission bits alone do not say so for root
    or a read-only or pseudo file system)."""
    out = Path(output)
    base = next((p for p in (out, *out.parents) if p.exists()), Path.cwd())
    if not base.is_dir():
        raise UsageError(f"-o {output}: {base} is a file, not a folder.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".kvscope-probe-", dir=base))
    except OSError as exc:
        raise UsageError(f"-o {output}: cannot create a folder in {base} ({exc.strerror or exc}).") from None
