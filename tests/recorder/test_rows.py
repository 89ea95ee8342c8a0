"""The hook's rows are schema columns in schema order (`recorder/columns.py` derives every order)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recorder_helpers import PROMPT_TOKENS, prompt_ids, tiny_model

import kvscope
from kvscope.recorder.allocator import AllocatorReading
from kvscope.recorder.batch_writer import Steps
from kvscope.recorder.columns import (
    ALLOCATOR_AT,
    ALLOCATOR_COLUMNS,
    HOOK_STEP_COLUMNS,
    LAYER_COLUMNS,
    WRITER_STEP_COLUMNS,
)
from kvscope.recorder.facts import LAYER_FIELDS
from kvscope.schema.tables import TABLES


def test_hook_and_writer_columns_are_the_steps_schema_in_order() -> None:
    schema = TABLES["steps"].column_names
    assert sorted(HOOK_STEP_COLUMNS + WRITER_STEP_COLUMNS) == sorted(schema)
    assert list(HOOK_STEP_COLUMNS) == [c for c in schema if c in HOOK_STEP_COLUMNS]  # schema order
    at = ALLOCATOR_AT
    assert HOOK_STEP_COLUMNS[at:at + len(ALLOCATOR_COLUMNS)] == ALLOCATOR_COLUMNS
    # the allocator reading's fields (and the C++ allocator_stats order, which tests compare) name these columns
    named = [f if f in ("alloc_retries", "num_ooms") else f"{f}_bytes" for f in AllocatorReading._fields[:6]]
    assert named == list(ALLOCATOR_COLUMNS)


def test_layer_rows_are_the_layers_schema_after_its_keys() -> None:
    assert TABLES["layers"].column_names[:3] == ["run_id", "gen_id", "step"]
    assert LAYER_FIELDS == LAYER_COLUMNS == tuple(TABLES["layers"].column_names[3:])


def test_the_rows_the_hook_hands_over_hold_what_their_columns_say(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    handed: list[tuple] = []
    with kvscope.record(model, tmp_path / "t", writer="thread") as rec:
        send = rec.writer.send

        def capture(message: Any) -> None:
            if isinstance(message, Steps):
                handed.extend(message.rows)
            send(message)

        rec.writer.send = capture
        out = model.generate(prompt_ids(), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        del out
        run_id = rec.run_id
    rows = [dict(zip(HOOK_STEP_COLUMNS, row, strict=True)) for row in handed]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["seq_len"] for r in rows] == [PROMPT_TOKENS + i for i in range(4)]
    assert all(r["run_id"] == run_id and r["gen_id"] == 0 and r["batch_size"] == 1 for r in rows)
    assert all(r[c] is None for r in rows for c in (*ALLOCATOR_COLUMNS, "nvml_total_bytes"))  # CPU: null
    assert all(r["recorder_ns"] > 0 and r["t_ns"] > 0 for r in rows)
