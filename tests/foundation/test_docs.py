"""docs/trace-format.md is generated from the schema and must not go stale."""

from __future__ import annotations

from pathlib import Path

from kvscope.schema import TABLES
from kvscope.schema.docs import render_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "trace-format.md"


def test_trace_format_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render_markdown(), (
        "docs/trace-format.md is stale: run `make docs` (python -m kvscope.schema.docs docs/trace-format.md)"
    )


def test_every_contract_column_is_documented() -> None:
    text = render_markdown()
    for table in TABLES.values():
        assert f"## `{table.name}`" in text
        for column in table.columns:
            assert column.doc, f"{table.name}.{column.name} has no description"
            assert f"| `{column.name}` |" in text
