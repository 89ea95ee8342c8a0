"""Generate docs/trace-format.md from the schema: `python -m kvscope.schema.docs [OUT]`."""

from __future__ import annotations

import sys
from pathlib import Path

from kvscope.schema.tables import FORMAT_VERSION, TABLES, Column


def _type_name(col: Column) -> str:
    return str(col.type).replace("timestamp[us, tz=UTC]", "timestamp (µs, UTC)")


def render_markdown() -> str:
    """The trace format reference, one section per table, one row per column."""
    lines = [
        f"# KVScope trace format {FORMAT_VERSION}",
        "",
        "Generated from `kvscope.schema` by `python -m kvscope.schema.docs docs/trace-format.md`;",
        "do not edit by hand (a test fails when this file is stale).",
        "",
        "A trace is a directory with one folder per table; each folder holds Parquet part files",
        "(`part-*.parquet`), written under a temporary name and renamed into place. Every part",
        f"carries the key-value metadata `kvscope.format = \"{FORMAT_VERSION}\"` and",
        "`kvscope.table`; a reader refuses another major version. Every row carries `run_id`, so",
        "traces combine by plain union: `read_parquet('traces/*/layers/*.parquet')`.",
        "Bytes are integers in bytes, times integer nanoseconds, instants UTC timestamps; readings",
        "the platform cannot give are null, never 0.",
        "",
        "Columns marked **yes** under *required* are the contract every reader relies on; the",
        "others are kvscope extensions that readers must not require.",
        "",
    ]
    for table in TABLES.values():
        lines += [f"## `{table.name}`", "", table.doc, ""]
        if table.sort_keys:
            lines += [f"Compacted parts are sorted by {', '.join(f'`{k}`' for k in table.sort_keys)}.", ""]
        lines += ["| column | type | unit | nullable | required | meaning |", "|---|---|---|---|---|---|"]
        for col in table.columns:
            lines.append(
                f"| `{col.name}` | {_type_name(col)} | {col.unit} | {'yes' if col.nullable else 'no'} "
                f"| {'**yes**' if col.required else 'no'} | {col.doc} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_markdown()
    if args:
        Path(args[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
