"""fragmentation judged by what it costs: unused bytes against a floor and the device's memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analyzer_helpers import MIB, detect, merge, run_row, step_rows, write_part

GIB = 1 << 30
H200 = 150_754_820_096  # NVML total of the H200 (140.4 GiB)


def _trace(tmp_path: Path, allocated: int | list[int], reserved: int | list[int], *, total: int | None = H200,
           limit: int | None = None, n: int = 64) -> Path:
    run = run_row()
    run["nvml_total_bytes"] = [total]
    run["memory_limit_bytes"] = [limit]
    run["options"] = [json.dumps({})]
    write_part(tmp_path, "run", run)
    write_part(tmp_path, "steps", merge(step_rows("r1", 0, list(range(64, 64 + n)), [MIB] * n,
                                                  allocated=allocated if isinstance(allocated, list) else [allocated] * n,
                                                  reserved=reserved if isinstance(reserved, list) else [reserved] * n,
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


def _growing(n: int = 64) -> list[int]:
    # 21 GiB allocated; unused grows by 128 MiB a step from 0: a mean of 3.94 GiB, F = 15.4%
    return [21 * GIB + i * 128 * MIB for i in range(n)]


def test_a_growing_unused_pool_is_a_warning(tmp_path: Path) -> None:
    (f,) = detect(_trace(tmp_path, 21 * GIB, _growing()), "fragmentation")
    assert (f.severity, f.value) == ("warning", pytest.approx(0.1506, abs=1e-3))
    assert f.evidence["mean_unused_bytes"] == pytest.approx(3.9375 * GIB)
    # the last quarter's mean (steps 48-63: 55.5 x 128 MiB) less the first decode step's 128 MiB
    assert f.evidence["unused_growth_bytes"] == pytest.approx(54.5 * 128 * MIB)
    assert "3.94 GiB unused on average, of up to 28.88 GiB reserved, 2.80% of the device's 140.40 GiB" in f.message


def test_a_flat_pool_left_by_the_prefill_is_info(tmp_path: Path) -> None:
    # the H200 recording of a gpt-oss-120b twin: a 4,000-token prefill leaves 7.6 GiB unused, flat
    n = 96
    reserved = [int(8.33 * GIB)] * n
    (f,) = detect(_trace(tmp_path / "flat", int(0.6 * GIB), reserved, n=n), "fragmentation")
    assert (f.severity, f.value) == ("info", pytest.approx(0.928, abs=1e-3))
    assert f.evidence["unused_growth_bytes"] == 0
    assert "already unused after the prefill and it changed by +0 B while decoding" in f.message
    # the same pool growing from nothing over the generation is fragmentation
    growing = [int(0.6 * GIB) + int(i * 7.73 * GIB / n) for i in range(n)]
    (g,) = detect(_trace(tmp_path / "growing", int(0.6 * GIB), growing, n=n), "fragmentation")
    assert g.severity == "warning"


def test_a_pool_left_by_the_prefill_is_judged_from_the_first_decode_step(tmp_path: Path) -> None:
    # the H200 recording of a gemma-4-31b twin, a 4,048-token prompt: step 0 still holds the
    # prefill's outputs (5.0 GiB allocated, 1.0 GiB unused), freed by step 1; then 3.3 GiB unused, flat
    n = 48
    reserved = [int(5.99 * GIB)] * n
    allocated = [int(4.99 * GIB)] + [int(2.67 * GIB)] * (n - 1)
    (f,) = detect(_trace(tmp_path, allocated, reserved, n=n), "fragmentation")
    assert f.severity == "info" and f.value == pytest.approx(0.546, abs=1e-3)
    assert f.evidence["first_step_unused_bytes"] == int(5.99 * GIB) - int(2.67 * GIB)
    assert f.evidence["unused_growth_bytes"] == 0
    assert "already unused after the prefill" in f.message


def test_the_floor_follows_the_device_or_its_limit(tmp_path: Path) -> None:
    # unused growing from 0 to 400 MiB (a mean of 200 MiB): above the 128 MiB floor, below 0.2% of an
    # H200 (287 MiB)
    args = (300 * MIB, [300 * MIB + 400 * MIB * i // 63 for i in range(64)])
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
