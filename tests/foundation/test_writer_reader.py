"""Writer → reader round trips, atomic parts, compaction, and reading with no kvscope code."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from kvscope.errors import TraceError
from kvscope.schema import FORMAT_VERSION, META_FORMAT, TraceMetadata
from kvscope.trace import TraceWriter, check_invariants, open_trace


def _meta() -> TraceMetadata:
    return TraceMetadata(model_name="tiny", model_type="llama", num_layers=2,
                         layer_types=["full_attention", "sliding_attention"], dtype="float16", run_id="r1")


def _write_steps(writer: TraceWriter, gen: int, steps: range) -> None:
    for step in steps:
        writer.append("steps", {"run_id": "r1", "gen_id": gen, "step": step, "t_ns": 1000 * (step + 1),
                                "seq_len": 4 + step, "batch_size": 1, "kv_bytes": 64 * (4 + step)})
        for layer in range(2):
            writer.append("layers", {
                "run_id": "r1", "gen_id": gen, "step": step, "layer": layer,
                "layer_type": ["full_attention", "sliding_attention"][layer], "cache_layer_class": "DynamicLayer",
                "k_shape": [1, 2, 4 + step, 4], "v_shape": [1, 2, 4 + step, 4], "k_dtype": "float16",
                "v_dtype": "float16", "k_bytes": 16 * (4 + step), "v_bytes": 16 * (4 + step),
                "kv_bytes": 32 * (4 + step), "aliased": False, "stored_tokens": 4 + step,
            })


def test_round_trip_and_compaction(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t")
    writer.append("run", _meta().to_row())
    _write_steps(writer, 0, range(0, 3))
    writer.flush()
    _write_steps(writer, 0, range(3, 5))
    writer.flush()
    assert len(list((tmp_path / "t" / "layers").glob("part-*.parquet"))) == 2
    writer.close()
    parts = list((tmp_path / "t" / "layers").glob("part-*.parquet"))
    assert len(parts) == 1, "close() compacts a table into one sorted part"
    trace = open_trace(tmp_path / "t")
    assert trace.num_rows("layers") == 10 and trace.num_rows("steps") == 5
    layers = trace.read("layers", ["layer", "step", "stored_tokens"]).to_pylist()
    assert [(r["layer"], r["step"]) for r in layers[:3]] == [(0, 0), (0, 1), (0, 2)]
    assert pq.ParquetFile(parts[0]).metadata.metadata[META_FORMAT] == FORMAT_VERSION.encode()
    report = check_invariants(trace)
    assert report.errors == []
    assert report.warnings == ["generation 0 of run r1 has steps but no generations row "
                               "(generate raised, see the events, or the recording was interrupted before it ended)."]


def test_metadata_round_trip(tmp_path: Path) -> None:
    meta = _meta()
    meta.labels = {"variant": "bf16"}
    with TraceWriter(tmp_path / "t") as writer:
        writer.append("run", meta.to_row())
    row = open_trace(tmp_path / "t").read("run").to_pylist()[0]
    back = TraceMetadata.from_row(row)
    assert back.labels == {"variant": "bf16"} and back.layer_types == meta.layer_types
    assert back.started_at == meta.started_at.replace(microsecond=meta.started_at.microsecond)


def test_unknown_table_and_column_are_refused(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t")
    with pytest.raises(TraceError, match="unknown trace table 'layer'"):
        writer.append("layer", {})
    with pytest.raises(TraceError, match="has no column"):
        writer.append("steps", {"run_id": "r", "stepp": 1})


def test_temporary_parts_are_invisible(small_trace: Path) -> None:
    # a writer killed mid-write leaves only a hidden .tmp file: neither we nor a glob reads it
    (small_trace / "layers" / ".part-deadbeef.parquet.tmp").write_bytes(b"PAR1 half written")
    trace = open_trace(small_trace)
    assert trace.num_rows("layers") == 4 * 2 * 32
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{small_trace}/layers/*.parquet')").fetchall()[0][0]
    assert n == 256


def test_plain_duckdb_and_polars_read_a_trace(small_trace: Path) -> None:
    rows = duckdb.sql(
        f"SELECT layer, max(stored_tokens) AS tokens, max(kv_bytes) AS bytes "
        f"FROM read_parquet('{small_trace}/layers/*.parquet') WHERE gen_id = 0 GROUP BY layer ORDER BY layer"
    ).fetchall()
    # 64 prompt tokens + 31 decode steps, 8 kv heads x 64 dims x 2 (K and V) x 2 bytes
    assert rows == [(layer, 95, 95 * 8 * 64 * 2 * 2) for layer in range(4)]
    frame = pl.scan_parquet(f"{small_trace}/steps/*.parquet").filter(pl.col("step") == 0).collect()
    assert frame.height == 2 and frame["seq_len"].to_list() == [64, 64]
    run = pl.read_parquet(f"{small_trace}/run/*.parquet")
    assert run["num_layers"].to_list() == [4] and run["format_version"].to_list() == [FORMAT_VERSION]


def test_leftovers_of_an_old_compaction_are_not_hidden(tmp_path: Path) -> None:
    """Parts left next to the part that merged them (an older kvscope's crash) are read by every
    reader alike; kvscope calls the trace invalid, and `compact` drops them once it has checked that the
    merged part holds each of their rows (its `kvscope.replaces` metadata alone hides nothing)."""
    from kvscope.trace.compact import compact_trace

    writer = TraceWriter(tmp_path / "t")
    writer.append("run", _meta().to_row())
    _write_steps(writer, 0, range(2))
    writer.flush()
    _write_steps(writer, 0, range(2, 4))
    writer.flush()
    old = {p.name: p.read_bytes() for p in (tmp_path / "t" / "layers").glob("part-*.parquet")}
    writer.close()
    for name, data in old.items():  # resurrect the replaced parts, as if deletion never happened
        (tmp_path / "t" / "layers" / name).write_bytes(data)
    trace = open_trace(tmp_path / "t")
    assert trace.num_rows("layers") == 16
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/t/layers/*.parquet')").fetchall() == [(16,)]
    report = check_invariants(trace)
    assert not report.ok and any("read twice" in e for e in report.errors)
    compact_trace(tmp_path / "t")
    trace = open_trace(tmp_path / "t")
    assert trace.num_rows("layers") == 8 and check_invariants(trace).ok
