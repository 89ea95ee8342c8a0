"""fragmentation, oom_forecast and preallocation_waste on tiny hand-written traces."""

from __future__ import annotations

from pathlib import Path

import pytest
from analyzer_helpers import MIB, detect, gen_rows, layer_rows, merge, run_row, step_rows, write_part

GIB = 1 << 30


def _steps_trace(tmp_path: Path, *gens: dict) -> Path:
    write_part(tmp_path, "run", run_row())
    write_part(tmp_path, "steps", merge(*gens))
    return tmp_path


def test_fragmentation_flags_mean_unused_fraction_and_retries(tmp_path: Path) -> None:
    n = 10
    healthy = step_rows("r1", 0, list(range(10, 20)), [0] * n, allocated=[90 * MIB] * n,
                        reserved=[100 * MIB] * n, retries=[2] * n)
    fragmented = step_rows("r1", 1, list(range(10, 20)), [0] * n, allocated=[70 * MIB] * n,
                           reserved=[100 * MIB] * n, retries=[2] * 5 + [3] * 5)
    findings = detect(_steps_trace(tmp_path, healthy, fragmented), "fragmentation")
    assert [(f.severity, f.gen_id, f.metric, f.value, f.threshold) for f in findings] == [
        ("warning", 1, "alloc_retries", 1.0, 0.0), ("warning", 1, "mean_fragmentation", pytest.approx(0.3), 0.15)]
    assert detect(tmp_path, "fragmentation", max_mean_fraction=0.5, max_alloc_retries=1) == []
    assert [f.severity for f in detect(tmp_path, "fragmentation", critical_fraction=0.25)] == ["critical", "warning"]


def test_fragmentation_needs_allocator_readings(tmp_path: Path) -> None:
    assert detect(_steps_trace(tmp_path, step_rows("r1", 0, [1, 2, 3], [1, 2, 3])), "fragmentation") == []


def test_oom_forecast_extrapolates_growth_to_the_device_total(tmp_path: Path) -> None:
    # 1 MiB per token, 60 GiB in use at 1000 tokens on an 80 GiB device: out at 1000 + 20480 tokens
    seq = list(range(901, 1001))
    used = [60 * GIB - (1000 - s) * MIB for s in seq]
    kv = [s * MIB for s in seq]
    trace = _steps_trace(tmp_path, step_rows("r1", 0, seq, kv, allocated=used, reserved=used,
                                             nvml_used=used, nvml_total=80 * GIB))
    (f,) = detect(trace, "oom_forecast")
    assert (f.severity, f.gen_id, f.metric, f.threshold) == ("info", 0, "tokens_to_oom", 2000.0)
    assert f.value == pytest.approx(1000 + 20 * 1024)
    # 59 GiB of other memory + 1000 MiB per sequence: 21 sequences fit, 22 do not
    assert f.evidence["max_batch_size"] == 21
    assert "at batch size 22" in f.message
    (tight,) = detect(trace, "oom_forecast", context_factor=30.0)
    assert tight.severity == "warning"


def test_oom_forecast_is_critical_after_an_oom_and_silent_without_a_total(tmp_path: Path) -> None:
    seq = [10, 11, 12]
    trace = _steps_trace(tmp_path, step_rows("r1", 0, seq, [s * MIB for s in seq], allocated=[GIB] * 3,
                                             reserved=[GIB] * 3, nvml_total=2 * GIB, ooms=[0, 0, 1]))
    assert [f.severity for f in detect(trace, "oom_forecast")] == ["critical"]
    cpu = _steps_trace(tmp_path / "cpu", step_rows("r1", 0, seq, [s * MIB for s in seq]))
    assert detect(cpu, "oom_forecast") == []


def test_preallocation_waste(tmp_path: Path) -> None:
    write_part(tmp_path, "run", run_row())
    steps = [0, 1]
    # 4 layers with capacity 1024 tokens holding 100: 2 KiB/token -> 2 MiB each, 1.8 MiB of it empty
    rows = [layer_rows("r1", 0, steps, i, [2 * MIB] * 2, [99, 100], capacity=[1024, 1024]) for i in range(4)]
    write_part(tmp_path, "layers", merge(*rows))
    write_part(tmp_path, "steps", step_rows("r1", 0, [99, 100], [8 * MIB] * 2))
    (f,) = detect(tmp_path, "preallocation_waste")
    assert (f.severity, f.gen_id, f.layer, f.metric, f.threshold) == ("warning", 0, None, "capacity_ratio", 2.0)
    assert f.value == pytest.approx(10.24)
    assert f.evidence["wasted_bytes"] == pytest.approx(4 * 2 * MIB * (1 - 100 / 1024))
    assert detect(tmp_path, "preallocation_waste", max_ratio=20.0) == []
    assert detect(tmp_path, "preallocation_waste", min_waste_bytes=16 * MIB) == []


def test_memory_cached_before_the_generation_is_info(tmp_path: Path) -> None:
    # 2.5 GiB freed while loading the model is still cached when generate() starts
    n = 10
    write_part(tmp_path, "run", run_row())
    write_part(tmp_path, "steps", step_rows("r1", 0, list(range(10, 20)), [0] * n, allocated=[330 * MIB] * n,
                                            reserved=[2840 * MIB] * n, retries=[0] * n))
    write_part(tmp_path, "generations", gen_rows("r1", [{"baseline_allocated": 322 * MIB,
                                                         "baseline_reserved": 2832 * MIB}]))
    (f,) = detect(tmp_path, "fragmentation")
    assert (f.severity, f.metric, f.value) == ("info", "mean_fragmentation", pytest.approx(2510 / 2840))
    assert f.evidence["cached_before_bytes"] == 2510 * MIB
    assert "empty_cache" in f.message
