"""Invalid traces: one-sentence errors and exit code 2 from `kvscope inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvscope.cli.main import main
from kvscope.schema import META_FORMAT, META_TABLE


def _layers_part(trace: Path) -> Path:
    return next((trace / "layers").glob("part-*.parquet"))


def _rewrite(path: Path, table: pa.Table, metadata: dict[bytes, bytes]) -> None:
    pq.write_table(table.replace_schema_metadata(metadata), path)


def _inspect(trace: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["inspect", str(trace)])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_sentence(err: str) -> None:
    assert err.startswith("kvscope: error: ")
    assert "\n" not in err and "Traceback" not in err and err.endswith(".")


def test_valid_trace_exits_0(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(small_trace), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and report["tables"]["layers"]["rows"] == 256
    assert report["tables"]["steps"]["rows"] == 64 and report["generations"] == 2
    assert report["runs"][0]["num_layers"] == 4 and report["format_versions"] == ["1.1"]


def test_future_major_version(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    table = pq.read_table(part)
    _rewrite(part, table, {META_FORMAT: b"2.0", META_TABLE: b"layers"})
    code, err = _inspect(small_trace, capsys)
    assert code == 2
    _one_sentence(err)
    assert "format 2.0" in err and "1.x" in err and "layers" in err


def test_newer_minor_version_is_accepted(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    table = pq.read_table(part)
    table = table.append_column("future_column", pa.array([1] * table.num_rows))
    _rewrite(part, table, {META_FORMAT: b"1.7", META_TABLE: b"layers"})
    assert _inspect(small_trace, capsys)[0] == 0


def test_truncated_part(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    code, err = _inspect(small_trace, capsys)
    assert code == 2
    _one_sentence(err)
    assert str(part) in err and "truncated or corrupt" in err


def test_missing_required_column(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    table = pq.read_table(part).drop_columns(["kv_bytes"])
    _rewrite(part, table, {META_FORMAT: b"1.0", META_TABLE: b"layers"})
    code, err = _inspect(small_trace, capsys)
    assert code == 2
    _one_sentence(err)
    assert "required column 'kv_bytes' of table 'layers' is missing" in err


def test_wrong_column_type(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    table = pq.read_table(part)
    index = table.schema.get_field_index("stored_tokens")
    table = table.set_column(index, "stored_tokens", table["stored_tokens"].cast(pa.string()))
    _rewrite(part, table, {META_FORMAT: b"1.0", META_TABLE: b"layers"})
    code, err = _inspect(small_trace, capsys)
    assert code == 2
    _one_sentence(err)
    assert "column 'stored_tokens' of table 'layers' has type string, expected int64" in err


def test_part_without_kvscope_metadata(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = _layers_part(small_trace)
    pq.write_table(pq.read_table(part).replace_schema_metadata({}), part)
    code, err = _inspect(small_trace, capsys)
    assert code == 2 and "no 'kvscope.format' metadata" in err


def test_not_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _inspect(tmp_path, capsys)
    assert code == 2
    _one_sentence(err)
    assert "not a kvscope trace" in err


def test_layers_row_without_steps_row(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for steps_part in (small_trace / "steps").glob("part-*.parquet"):
        table = pq.read_table(steps_part)
        keep = [not (g == 1 and s == 5) for g, s in zip(table["gen_id"].to_pylist(), table["step"].to_pylist(), strict=True)]
        _rewrite(steps_part, table.filter(pa.array(keep)), table.schema.metadata)
    assert main(["inspect", str(small_trace), "--format", "json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert report["errors"] == ["layers: 1 (gen_id, step) pair(s) have no steps row, first gen 1 step 5."]


def test_negative_bytes_and_backwards_time(small_trace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps_part = next((small_trace / "steps").glob("part-*.parquet"))
    table = pq.read_table(steps_part)
    kv = table["kv_bytes"].to_pylist()
    kv[3] = -1
    t_ns = table["t_ns"].to_pylist()
    t_ns[10] = 0
    table = table.set_column(table.schema.get_field_index("kv_bytes"), "kv_bytes", pa.array(kv))
    table = table.set_column(table.schema.get_field_index("t_ns"), "t_ns", pa.array(t_ns))
    _rewrite(steps_part, table, table.schema.metadata)
    assert main(["inspect", str(small_trace), "--format", "json"]) == 2
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert "steps: column 'kv_bytes' has a negative value (-1)." in errors
    assert any(e.startswith("steps: t_ns goes backwards at step 10 of generation ") for e in errors)


def test_folder_of_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvscope.trace.synth import SynthSpec, build_synthetic_trace

    for i in range(3):
        build_synthetic_trace(tmp_path / f"run{i}", SynthSpec(num_layers=2, steps=8, seed=i))
    assert main(["inspect", str(tmp_path), "--format", "json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["tables"]["layers"]["rows"] for r in reports] == [16, 16, 16]
