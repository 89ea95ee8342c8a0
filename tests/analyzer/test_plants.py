"""Synthetic traces: a healthy one yields no warning; each plant is flagged by its detector only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvscope.analyzer import analyze, load_traces

HYBRID: dict[str, Any] = {"num_layers": 6, "layer_types": ("sliding_attention", "full_attention") * 3,
                          "sliding_window": 48, "prompt_tokens": 16, "steps": 128, "generations": 3}

PLANTS = [
    ({"retention": 0.3}, "post_eos"),
    ({"retention": 0.3, "generations": 1}, "post_eos"),
    ({"fragmentation": True}, "fragmentation"),
    ({"superlinear": True}, "growth_curve"),
    ({"odd_layer": 3}, "layer_anomaly"),
    ({"undeclared_sliding": True}, "layer_uniformity"),
    ({"preallocated": True}, "preallocation_waste"),
    ({"outside_growth": True, "generations": 8}, "post_eos"),
]


def _flagged(trace) -> set[str]:  # noqa: ANN001
    with load_traces([trace]) as tables:
        return {f.detector for f in analyze(tables) if f.severity != "info"}


@pytest.mark.parametrize("spec", [
    {},
    HYBRID,
    {**HYBRID, "generations": 10, "steps": 40},
    {**HYBRID, "batch_size": 4, "dtype": "float32"},
    {**HYBRID, "device": "cpu"},
    {"num_layers": 3, "layer_types": ("latent",) * 3, "kv_lora_rank": 256, "qk_rope_head_dim": 32},
], ids=["default", "hybrid", "many-gens", "batch-fp32", "cpu", "latent"])
def test_healthy_trace_has_no_warning(spec: dict[str, Any], synth) -> None:  # noqa: ANN001
    assert _flagged(synth(**spec)) == set()


def test_healthy_hybrid_trace_reports_saturation_and_modes(synth) -> None:  # noqa: ANN001
    with load_traces([synth(**HYBRID)]) as tables:
        infos = {(f.detector, f.metric) for f in analyze(tables)}
    assert ("growth_curve", "saturated_tokens") in infos
    assert ("layer_uniformity", "cv") in infos


@pytest.mark.parametrize(("plant", "detector"), PLANTS, ids=[f"{d}-{i}" for i, (_, d) in enumerate(PLANTS)])
def test_each_plant_is_flagged_by_its_detector_only(plant: dict[str, Any], detector: str, synth) -> None:  # noqa: ANN001
    assert _flagged(synth(**{**HYBRID, **plant})) == {detector}
    if "undeclared_sliding" not in plant:  # the default geometry has no sliding layers to plant it in
        assert _flagged(synth(**plant)) == {detector}


SAMPLES = Path(__file__).resolve().parents[2] / "traces"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="no recorded sample traces in traces/")
def test_recorded_sample_traces_of_healthy_twins_have_no_warning() -> None:
    with load_traces([SAMPLES]) as tables:
        findings = analyze(tables)
    assert findings and [f for f in findings if f.severity != "info"] == []
    # the pythia twin's first generation leaves cuBLAS's workspace allocated: warm-up, not a leak
    assert any(f.detector == "post_eos" and f.metric == "live_retention" and f.evidence.get("warmup")
               for f in findings)
