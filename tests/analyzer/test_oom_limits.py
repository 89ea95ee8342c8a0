"""oom_forecast under a memory cap, and the oom_event detector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analyzer_helpers import MIB, detect, gen_rows, merge, run_row, step_rows, write_part

GIB = 1 << 30
H200 = 150_754_820_096
CAP = int(0.02 * 146_800_000_000)  # about 2.73 GiB: set_per_process_memory_fraction(0.02)


def _capped_run(limit: int | None, fraction: float = 0.02) -> dict:
    run = run_row()
    run["nvml_total_bytes"] = [H200]
    run["memory_limit_bytes"] = [limit]
    options = {} if limit is None else {"memory_limit": {"bytes": limit, "sources": [
        {"device": 0, "kind": "per_process_memory_fraction", "fraction": fraction, "device_bytes": 146_800_000_000}]}}
    run["options"] = [json.dumps(options)]
    return run


def _growing(tmp_path: Path, limit: int | None) -> Path:
    # 1 GiB of weights and 1 MiB of cache per token, NVML far below the device's total
    seq = list(range(64, 513))
    reserved = [GIB + s * MIB + 4 * MIB for s in seq]
    write_part(tmp_path, "run", _capped_run(limit))
    write_part(tmp_path, "steps", step_rows("r1", 0, seq, [s * MIB for s in seq], allocated=[r - 4 * MIB for r in reserved],
                                            reserved=reserved, nvml_used=[r + 500 * MIB for r in reserved],
                                            nvml_total=H200))
    return tmp_path


def test_the_forecast_uses_the_allocators_cap_and_names_it(tmp_path: Path) -> None:
    (free,) = detect(_growing(tmp_path / "free", None), "oom_forecast")
    assert free.severity == "info" and free.value > 130_000  # 140 GiB of NVML total
    (capped,) = detect(_growing(tmp_path / "capped", CAP), "oom_forecast")
    # headroom = cap − peak reserved (1 GiB + 516 MiB), at 1 MiB per token after 512 tokens
    expected = 512 + (CAP - (GIB + 516 * MIB)) / MIB
    assert capped.value == pytest.approx(expected)
    assert capped.value == pytest.approx(1772, abs=1)  # 2,800 MiB cap − 1,540 MiB in use = 1,260 tokens more
    assert capped.evidence["memory_limit_bytes"] == CAP and capped.evidence["total_bytes"] == CAP
    assert "allowed by torch.cuda.set_per_process_memory_fraction(0.02) of 136.72 GiB" in capped.message
    assert capped.severity == "info"  # 1772 tokens > 2 x 512
    (tight,) = detect(tmp_path / "capped", "oom_forecast", context_factor=4.0)
    assert tight.severity == "warning"


def _oom_trace(tmp_path: Path, with_generation_row: bool = False) -> Path:
    # two generations end normally, the third runs out at step 961 under the cap
    write_part(tmp_path, "run", _capped_run(CAP))
    gens = []
    for gen, steps in ((0, 200), (1, 200), (2, 962)):
        seq = list(range(64, 64 + steps))
        reserved = [GIB + s * (1536 << 10) for s in seq]
        gens.append(step_rows("r1", gen, seq, [s * (1536 << 10) for s in seq], allocated=reserved,
                              reserved=reserved, nvml_total=H200, ooms=[0] * steps))
    write_part(tmp_path, "steps", merge(*gens))
    readings = [{"baseline_allocated": GIB, "baseline_reserved": GIB, "peak_allocated": GIB + 400 * MIB,
                 "post_empty_cache_allocated": GIB, "post_empty_cache_reserved": GIB}] * (3 if with_generation_row else 2)
    write_part(tmp_path, "generations", gen_rows("r1", readings))
    detail = {"exception": "OutOfMemoryError",
              "message": "CUDA out of memory. Tried to allocate 3.00 MiB. GPU 0 has a total capacity of 139.81 GiB "
                         "of which 136.50 GiB is free. Including non-PyTorch memory, this process has 3.30 GiB memory "
                         "in use. Of the allocated memory 2.70 GiB is allocated by PyTorch, and 12.00 MiB is reserved "
                         "by PyTorch but unallocated.",
              "last_step": {"step": 960, "seq_len": 1024, "kv_bytes": 1024 * (1536 << 10),
                            "allocator": {"allocated": GIB + 1024 * (1536 << 10), "reserved": GIB + 1024 * (1536 << 10),
                                          "peak_allocated": 2_900_000_000, "num_ooms": 0, "alloc_retries": 1}},
              "allocator_now": {"0": {"num_ooms": 1, "num_alloc_retries": 2}}, "nvml_used_bytes": 3_540_000_000}
    write_part(tmp_path, "events", {"run_id": ["r1"], "gen_id": [2], "step": [961], "t_ns": [10**9], "kind": ["oom"],
                                    "detail": [json.dumps(detail)]})
    return tmp_path


def test_an_oom_event_is_a_critical_finding_with_what_would_have_fitted(tmp_path: Path) -> None:
    (f,) = detect(_oom_trace(tmp_path), "oom_event")
    assert (f.severity, f.gen_id, f.metric, f.value) == ("critical", 2, "oom_step", 961.0)
    ev = f.evidence
    assert ev["context_tokens"] == 1025  # the last recorded step held 1024; the failing one adds one
    assert ev["tried_to_allocate_bytes"] == 3 * MIB
    assert ev["limit_bytes"] == CAP
    # each token costs 1.5 MiB of cache: what fitted under the cap beside 1 GiB of other memory
    assert ev["kv_bytes_per_token"] == pytest.approx(1536 << 10, rel=1e-3)
    assert ev["fitting_tokens"] == int((CAP - GIB) / (1536 << 10))
    assert "ran out of memory at step 961 of generation 2 (1,025 tokens of context)" in f.message
    assert "tried to allocate 3.00 MiB" in f.message
    assert f"about {int((CAP - GIB) / (1536 << 10)):,} tokens" in f.message
    assert "set_per_process_memory_fraction" in f.message


def test_a_generation_cut_off_by_a_crash_is_info(tmp_path: Path) -> None:
    findings = detect(_oom_trace(tmp_path), "oom_event")
    assert [f.metric for f in findings] == ["oom_step"]  # the OOM explains the missing row
    # steps without a generations row and no event: a crash (kill -9, OOM killer)
    other = tmp_path / "killed"
    _oom_trace(other)
    for part in (other / "events").iterdir():
        part.unlink()
    (f,) = detect(other, "oom_event")
    assert (f.severity, f.gen_id, f.metric, f.value) == ("info", 2, "interrupted_steps", 962.0)
    assert "generation 2 stopped after 962 recorded steps (1,025 tokens) without finishing" in f.message
    # a trace whose generations all have rows has nothing to say
    complete = tmp_path / "complete"
    _oom_trace(complete, with_generation_row=True)
    for part in (complete / "events").iterdir():
        part.unlink()
    assert detect(complete, "oom_event") == []


def test_a_generation_ended_by_an_exception_names_it(tmp_path: Path) -> None:
    _oom_trace(tmp_path)
    for part in (tmp_path / "events").iterdir():
        part.unlink()
    detail = {"exception": "KeyboardInterrupt", "message": "", "last_step": {"step": 961}}
    write_part(tmp_path, "events", {"run_id": ["r1"], "gen_id": [2], "step": [962], "t_ns": [10**9],
                                    "kind": ["error"], "detail": [json.dumps(detail)]})
    (f,) = detect(tmp_path, "oom_event")
    assert (f.severity, f.metric, f.evidence["event"]) == ("info", "interrupted_steps", "error")
    assert "without finishing, by KeyboardInterrupt" in f.message
    assert detect(tmp_path, "oom_event", report_interrupted=False) == []


def test_oom_and_cache_events_of_the_wrong_json_types_are_read_as_missing(tmp_path: Path) -> None:
    """Someone else's trace may hold any JSON under the recorder's keys (found by mutating traces:
    a dict as the OOM message, a string as failed_steps, a list as memory_limit raised TypeError)."""
    _oom_trace(tmp_path)
    for part in (tmp_path / "events").iterdir():
        part.unlink()
    for part in (tmp_path / "run").iterdir():
        part.unlink()
    run = _capped_run(CAP)
    run["options"] = [json.dumps({"memory_limit": {"sources": ["per_process_memory_fraction", {"fraction": "x"}]},
                                  "cache_seen": False, "cache_not_seen_generations": "all"})]
    write_part(tmp_path, "run", run)
    oom = {"message": {"a": 1}, "exception": ["x"], "last_step": {"seq_len": "1024", "kv_bytes": -5,
                                                                 "allocator": {"allocated": 1e308, "reserved": [1]}},
           "allocator_now": "none", "nvml_used_bytes": True}
    walk = {"source": "cache_walk", "failed_steps": "abc", "model_type": 7}
    write_part(tmp_path, "events", {"run_id": ["r1", "r1"], "gen_id": [2, 1], "step": [961, 5], "t_ns": [10**9, 10**8],
                                    "kind": ["oom", "error"], "detail": [json.dumps(oom), json.dumps(walk)]})
    (f,) = detect(tmp_path, "oom_event")
    assert (f.severity, f.gen_id, f.value) == ("critical", 2, 961.0)
    assert f.message.startswith("the run ran out of memory at step 961 of generation 2: no allocator reading under "
                                "the 2.73 GiB memory limit;")
    assert f.evidence["tried_to_allocate_bytes"] is None and f.evidence["exception"] is None
    seen = detect(tmp_path, "cache_seen")
    # cache_not_seen_generations not a list: the run's cache_seen false still says so, for the run
    assert [(f.metric, f.gen_id, f.value) for f in seen] == [("no_cache_steps", None, 0), ("unreadable_cache_steps", 1, 1)]
