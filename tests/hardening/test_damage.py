"""Damaged data is refused: page checksums written and verified; too many parts refused, then compacted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hardening_helpers import one_line_error

from kvscope.schema.tables import TABLES
from kvscope.trace import reader
from kvscope.trace.invariants import check_invariants, decode_part
from kvscope.trace.reader import PartInfo, open_trace
from kvscope.trace.writer import TraceWriter, write_options

Cli = Callable[..., tuple[int, str, str]]


def _flip_in_values(path: Path, value: int) -> None:
    """Change one stored int64 in place (uncompressed plain pages: the value's bytes are in the file)."""
    raw = bytearray(path.read_bytes())
    needle = value.to_bytes(8, "little")
    at = raw.find(needle)
    assert at > 0
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("checksum", [True, False])
def test_page_checksums_catch_a_silent_bit_flip(tmp_path: Path, checksum: bool) -> None:
    """A flipped bit in an uncompressed page changes a value silently unless pages carry checksums."""
    data = pa.table({"run_id": ["r"] * 4, "gen_id": pa.array([0] * 4, pa.int32()),
                     "step": pa.array(range(4), pa.int32()), "t_ns": pa.array([11, 22, 33, 987654321], pa.int64())})
    data = data.replace_schema_metadata(TABLES["steps"].arrow_schema().metadata)
    path = tmp_path / "part-x.parquet"
    pq.write_table(data, path, compression="none", use_dictionary=False, write_statistics=False,
                   write_page_checksum=checksum)
    _flip_in_values(path, 987654321)
    info = PartInfo(path, "steps", "1.0", 4, path.stat().st_size, tuple(data.column_names))
    problem = decode_part(info)
    if checksum:
        assert problem is not None and "cannot be decoded" in problem
    else:  # what a trace without checksums would let through
        assert problem is None and pq.read_table(path)["t_ns"][3].as_py() != 987654321


def test_writer_writes_page_checksums() -> None:
    assert write_options(TABLES["layers"], TABLES["layers"].arrow_schema())["write_page_checksum"] is True


def test_too_many_parts_refused_then_compacted(tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed flush_every=1 recording: one part per step, more than the limit (lowered for the test)."""
    monkeypatch.setattr(reader, "MAX_PARTS", 50)
    monkeypatch.setattr(reader.open_trace, "__kwdefaults__", {"max_parts": 50})
    from kvscope.trace import writer as writer_module

    monkeypatch.setattr(writer_module, "COMPACT_GROUP", 7)  # several groups, the last one short
    from kvscope.schema import TraceMetadata

    w = TraceWriter(tmp_path / "t")
    meta = TraceMetadata(model_name="m", model_type="t", num_layers=1, layer_types=["full_attention"],
                         dtype="float16", device="cpu", model_config={})
    w.append("run", meta.to_row())
    for step in range(60):
        w.extend("steps", {"run_id": [meta.run_id], "gen_id": [0], "step": [step], "t_ns": [step * 10],
                           "seq_len": [step + 1], "batch_size": [1], "kv_bytes": [step * 4]})
        w.flush()
    trace = tmp_path / "t"
    code, _out, err = cli("inspect", trace)
    assert code == 2 and "kvscope compact" in one_line_error(err) and "61 part files" in err
    code, out, err = cli("compact", trace)
    assert code == 0 and "merged 60 part(s)" in out, err
    t = open_trace(trace)
    assert len(t.parts["steps"]) == 1 and t.num_rows("steps") == 60 and check_invariants(t).ok
    steps = t.read("steps", ["step", "t_ns"])
    assert steps["step"].to_pylist() == list(range(60))
    assert np.all(np.diff(steps["t_ns"].to_numpy()) > 0)
    assert cli("inspect", trace)[0] == 0


def test_row_group_expanding_past_the_limit_is_refused_unread(trace: Path, cli: Cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """From the footer's row-group total alone (the limit lowered: a real one needs 512 MiB of data)."""
    monkeypatch.setattr(reader, "MAX_ROW_GROUP_BYTES", 2000)
    code, _out, err = cli("inspect", trace)
    assert code == 2 and "refused before it is decoded" in one_line_error(err)

