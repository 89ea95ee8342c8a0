"""Models split over devices: per-device rows, and the device that runs out first is named.

Synthetic traces stand in for two fake devices (the per-device allocator and NVML readings the
recorder writes to device_steps) and for a two-rank tensor-parallel job (one run per rank, one
job_id, in one parent folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvscope
from kvscope.analyzer import load_traces
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

GIB = 1 << 30
MIB = 1 << 20
# 256 steps of 32 KV heads x 128 (bf16): 16 KiB per token per layer
BIG = {"num_kv_heads": 32, "head_dim": 128, "steps": 256, "prompt_tokens": 64}


def _device_findings(paths: list[Path]) -> list[kvscope.Finding]:
    return [f for f in kvscope.analyze(paths).findings if f.detector == "device_memory"]


def test_a_split_model_has_rows_per_device_and_per_layer(tmp_path: Path) -> None:
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=6, devices=("cuda:0", "cuda:1"),
                                                           layers_per_device=(2, 4), generations=2, **BIG))
    with load_traces([path]) as t:
        owners = t.rows("SELECT device, count(*) FROM layer_devices WHERE gen_id = 0 GROUP BY 1 ORDER BY 1")
        assert owners == [("cuda:0", 2), ("cuda:1", 4)]
        # per step, the devices' KV bytes add up to the step total; each device holds its own layers' bytes
        mismatched = t.rows("""
            SELECT count(*) FROM (SELECT gen_id, step, sum(kv_bytes) AS kv FROM device_steps WHERE step >= 0
                                  GROUP BY 1, 2) d JOIN steps s USING (gen_id, step) WHERE d.kv <> s.kv_bytes""")
        assert mismatched == [(0,)]
        share = t.rows("""SELECT device, max(kv_bytes) FROM device_steps WHERE gen_id = 0 GROUP BY 1 ORDER BY 1""")
        assert share[1][1] == 2 * share[0][1]  # 4 layers against 2


def test_the_device_holding_most_of_the_cache_runs_out_first_and_the_split_is_unbalanced(tmp_path: Path) -> None:
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(
        num_layers=6, devices=("cuda:0", "cuda:1"), layers_per_device=(1, 5), device_memory_bytes=(4 * GIB, 4 * GIB),
        weights_bytes=3 * GIB, **BIG))
    found = {f.metric: f for f in _device_findings([path])}
    first = found["first_device_tokens_to_oom"]
    assert first.evidence["device"] == "cuda:1"
    assert first.message.startswith("cuda:1 runs out first") and "it holds 83% of the cache (5 layers)" in first.message
    assert [d["device"] for d in first.evidence["devices"]] == ["cuda:1", "cuda:0"]
    unbalanced = found["kv_share_over_mean"]
    assert unbalanced.severity == "warning" and unbalanced.value == 5 / 3
    assert "cuda:1 holds 83% of the KV cache" in unbalanced.message and "5 of 6 layers" in unbalanced.message
    verdict = kvscope.analyze([path]).verdict.worst
    assert verdict is not None and verdict.aspect("oom").label.startswith("cuda:1 first")


def test_the_device_with_less_memory_runs_out_first_on_an_even_split(tmp_path: Path) -> None:
    # the same cache on each device; cuda:0 has 3.5 GiB (another process holds the rest)
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(
        num_layers=6, devices=("cuda:0", "cuda:1"), device_memory_bytes=(int(3.5 * GIB), 8 * GIB),
        weights_bytes=3 * GIB, **BIG))
    found = {f.metric: f for f in _device_findings([path])}
    assert found["first_device_tokens_to_oom"].evidence["device"] == "cuda:0"
    assert "kv_share_over_mean" not in found  # 3 and 3 layers: balanced
    tokens = {d["device"]: d["tokens_to_oom"] for d in found["first_device_tokens_to_oom"].evidence["devices"]}
    # cuda:0: (3.5 GiB - its peak) / 48 KiB per token; cuda:1 has 4.5 GiB more headroom
    assert tokens["cuda:1"] - tokens["cuda:0"] == pytest.approx(4.5 * GIB / (3 * 16 * 1024), rel=1e-9)


def test_a_forecast_inside_twice_the_context_is_a_warning(tmp_path: Path) -> None:
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(
        num_layers=6, devices=("cuda:0", "cuda:1"), layers_per_device=(3, 3),
        device_memory_bytes=(8 * GIB, 2 * GIB - 400 * MIB), weights_bytes=3 * GIB, **BIG))
    (first,) = [f for f in _device_findings([path]) if f.metric == "first_device_tokens_to_oom"]
    assert first.severity == "warning" and first.evidence["device"] == "cuda:1"
    assert first.value < first.threshold == 2 * (64 + 255)


def test_retention_on_one_device_names_that_device(tmp_path: Path) -> None:
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(
        num_layers=6, devices=("cuda:0", "cuda:1"), generations=3, retention=0.9, retention_device="cuda:1",
        weights_bytes=3 * GIB, num_kv_heads=64, head_dim=256, steps=256))
    kept = [f for f in _device_findings([path]) if f.metric == "device_retained_bytes"]
    assert kept and {f.evidence["device"] for f in kept} == {"cuda:1"} and {f.gen_id for f in kept} == {0, 1, 2}
    assert kept[0].message.startswith("cuda:1 keeps ")


def test_a_two_rank_job_is_read_as_one_job_and_the_rank_that_runs_out_first_is_named(tmp_path: Path) -> None:
    job = tmp_path / "job"
    for rank, memory in ((0, 8 * GIB), (1, 4 * GIB)):
        build_synthetic_trace(job / f"rank-{rank}", SynthSpec(
            run_id=f"r{rank}", job_id="job-7", rank=rank, world_size=2, device=f"cuda:{rank}",
            total_memory_bytes=memory, weights_bytes=2 * GIB, **BIG))
    with load_traces([job]) as t:
        assert t.rows("SELECT job_id, rank, world_size FROM run ORDER BY rank") == [("job-7", 0, 2), ("job-7", 1, 2)]
    found = [f for f in _device_findings([job]) if f.metric == "first_device_tokens_to_oom"]
    assert len(found) == 1  # one forecast for the job, not one per rank
    (first,) = found
    assert first.run_id == "r1" and first.evidence["rank"] == 1 and first.evidence["job_id"] == "job-7"
    assert first.message.startswith("rank 1 (cuda:1) runs out first")


def test_one_device_outside_a_job_is_left_to_the_single_device_detectors(tmp_path: Path) -> None:
    path = build_synthetic_trace(tmp_path / "t", SynthSpec(**BIG))
    assert _device_findings([path]) == []
    assert [f for f in kvscope.analyze([path]).findings if f.detector == "oom_forecast"]
