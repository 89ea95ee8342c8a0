"""fragmentation judged by what it costs: unused bytes against a floor and the device's memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analyzer_helpers import MIB, detect, merge, run_row, step_rows, write_part

GIB = 1 << 30
H200 = 150_754_820_096  # NVML total of the H200 (140.4 GiB)


def _trace(tmp_path: Path, allocated: int, reserved: int, *, total: int | None = H200,
           limit: int | None = None, n: int = 64) -> Path:
    run = run_row()
    run["nvml_total_bytes"] = [total]
    run["memory_limit_bytes"] = [limit]
    run["options"] = [json.dumps({})]
    write_part(tmp_path, "run", run)
    write_part(tmp_path, "steps", merge(step_rows("r1", 0, list(range(64, 64 + n)), [MIB] * n,
                                                  allocated=[allocated] * n, reserved=[reserved] * n,
                                                  retries=[0] * n, nvml_total=total)))
    return tmp_path


def test_a_small_pool_at_sixteen_percent_is_info_with_both_numbers(tmp_path: Path) -> None:
    # the issue: a healthy gpt-oss-20b shrunk twin, about 300 MiB reserved, F = 16%
    (f,) = detect(_trace(tmp_path, 252 * MIB, 300 * MIB), "fragmentation")
    assert (f.severity, f.metric, f.value) == ("info", "mean_fragmentation", pytest.approx(0.16))
    assert f.evidence["mean_unused_bytes"] == 48 * MIB
    assert f.evidence["min_unused_bytes"] == pytest.approx(0.002 * H200)  # 287.5 MiB on an H200
    assert "48.00 MiB unused on average, of up to 300.00 MiB reserved, 0.03% of the device's 140.40 GiB" in f.message
    assert "nothing to do" in f.message


def test_the_same_fraction_of_a_large_pool_is_a_warning(tmp_path: Path) -> None:
    (f,) = detect(_trace(tmp_path, 21 * GIB, 25 * GIB), "fragmentation")
    assert (f.severity, f.value) == ("warning", pytest.approx(0.16))
    assert f.evidence["mean_unused_bytes"] == 4 * GIB
    assert "4.00 GiB unused on average, of up to 25.00 GiB reserved, 2.85% of the device's 140.40 GiB" in f.message


def test_the_floor_follows_the_device_or_its_limit(tmp_path: Path) -> None:
    # 200 MiB unused at F = 40%: above the 128 MiB floor, below 0.2% of an H200 (287 MiB)
    args = (300 * MIB, 500 * MIB)
    assert [f.severity for f in detect(_trace(tmp_path / "h200", *args), "fragmentation")] == ["info"]
    # capped at 2.93 GiB by a memory fraction: the device share is 6 MiB, the 128 MiB floor rules
    capped = _trace(tmp_path / "capped", *args, limit=int(2.93 * GIB))
    (f,) = detect(capped, "fragmentation")
    assert f.severity == "warning" and f.evidence["device_bytes"] == int(2.93 * GIB)
    assert "6.67% of the device's 2.93 GiB" in f.message
    # no device total (no NVML): only the absolute floor
    assert [f.severity for f in detect(_trace(tmp_path / "nonvml", *args, total=None), "fragmentation")] == [
        "warning"]
    assert [f.severity for f in detect(tmp_path / "nonvml", "fragmentation", min_unused_bytes=256 * MIB)] == [
        "info"]
