"""The example queries of docs/sql.md run, and answer what the text says they answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvscope.analyzer import load_traces
from kvscope.analyzer.sql import query_rows

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"


def _queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_example_queries() -> None:
    assert len(_queries()) >= 5


@pytest.mark.parametrize("index", range(6))
def test_example_query_runs(index: int, synth) -> None:  # noqa: ANN001
    trace = synth(num_layers=4, layer_types=("sliding_attention", "full_attention") * 2, sliding_window=32,
                  prompt_tokens=8, generations=2, retention=0.25, run_id="docs")
    query = _queries()[index]
    with load_traces([trace]) as t:
        columns, rows = query_rows(t, query)
    assert columns and rows
    if "bytes_per_token" in columns and "k_dtype" in columns:
        assert {r[columns.index("bytes_per_token")] for r in rows} == {2048}
    if "live_retention" in columns:
        assert [round(r[columns.index("live_retention")], 2) for r in rows] == [0.25, 0.25]
    if "layer_type" in columns and "max_tokens" in columns:
        assert [(r[1], r[3]) for r in rows] == [("full_attention", 135), ("sliding_attention", 31)]
