"""Cross-attention KV and recurrent state are constant in tokens: the detectors that judge bytes per
token (cache_density, layer_anomaly, layer_uniformity) or growth (growth_curve) leave them out, so a
hybrid or an encoder-decoder reads as healthy as it is."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from model_zoo import tiny_case

import kvscope
from kvscope.schema.layer_types import CONSTANT_IN_TOKENS, constant_types_sql

pytest.importorskip("duckdb")


def _trace(model_type: str, path: Path, new: int = 12) -> Path:
    case = tiny_case(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with kvscope.record(case.model, path, writer="thread", nvml=False) as rec:
            case.model.generate(**case.inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            rec.settle()
    return path


def test_the_sql_list_names_every_constant_type() -> None:
    assert constant_types_sql() == "('conv', 'cross_attention', 'recurrent', 'ssm')"
    assert CONSTANT_IN_TOKENS == {"conv", "cross_attention", "recurrent", "ssm"}


def test_a_hybrid_model_reads_as_dense_as_its_geometry(tmp_path: Path) -> None:
    """jamba: one attention layer, one mamba layer. Counted per token, the mamba layer's state made
    the cache look 0.59x as dense as the geometry (a warning)."""
    path = _trace("jamba", tmp_path / "trace")
    findings = kvscope.analyze([path], detectors=["cache_density", "layer_anomaly", "growth_curve"]).findings
    assert not [f for f in findings if f.severity != "info"], [f.message for f in findings]
    density = [f for f in findings if f.detector == "cache_density"]
    assert len(density) == 1 and density[0].value == 256  # bytes per token per layer: 2 x 2 heads x 16 x 4 B
    assert density[0].evidence["ratio"] == pytest.approx(1.0)


def test_cross_attention_is_not_a_mode_of_the_decoder_layers(tmp_path: Path) -> None:
    path = _trace("whisper", tmp_path / "trace")
    findings = kvscope.analyze([path], detectors=["layer_uniformity", "growth_curve", "layer_anomaly"]).findings
    assert not [f for f in findings if f.severity != "info"], [f.message for f in findings]
    uniformity = [f for f in findings if f.detector == "layer_uniformity"]
    assert len(uniformity) == 1
    assert "cross_attention" not in uniformity[0].message and "over 2 layers" in uniformity[0].message
