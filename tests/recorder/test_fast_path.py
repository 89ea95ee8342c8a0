"""The hook's fast path (raw facts, expanded in batches) agrees with the general walk exactly."""

from __future__ import annotations

import pytest
import torch

from kvscope.recorder.expand import expand_steps
from kvscope.recorder.measure import FastStep, StepMeasure, measure_cache
from kvscope.recorder.model_layout import ModelLayout

cache_utils = pytest.importorskip("transformers.cache_utils")
DynamicLayer = getattr(cache_utils, "DynamicLayer", None)
pytestmark = pytest.mark.skipif(DynamicLayer is None, reason="this transformers release has no cache layer classes")


class _Scanned:
    """An unknown layer class: measured by the general walk (vars scanned for tensors)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, layers: list) -> None:
        self.layers = layers


def _dynamic(keys: torch.Tensor, values: torch.Tensor) -> object:
    layer = DynamicLayer.__new__(DynamicLayer)
    layer.keys, layer.values = keys, values
    return layer


def _cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    shared = torch.randn(1, 2, 6, 8)
    qkv = torch.randn(1, 6, 3, 2, 8)
    window = torch.randn(1, 2, 20, 8)
    plain_k, plain_v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    return [
        (shared, shared),  # K and V the same tensor
        (qkv[:, :, 1], qkv[:, :, 2]),  # interleaved views of a fused projection
        (window[:, :, -7:], torch.randn(1, 2, 20, 8)[:, :, -7:]),  # sliding views pin their extent
        (plain_k, plain_v),
        (plain_k, plain_v),  # a layer sharing another layer's tensors
    ]


def test_fast_path_matches_the_general_walk() -> None:
    cases = _cases()
    layout = ModelLayout("test", len(cases), ("full_attention",) * len(cases), None, None, "eager", "float32", "cpu", ())
    fast = measure_cache(_Cache([_dynamic(k, v) for k, v in cases]), layout, 6)
    slow = measure_cache(_Cache([_Scanned(k, v) for k, v in cases]), layout, 6)
    assert isinstance(fast, FastStep) and isinstance(slow, StepMeasure)
    tables, totals = expand_steps([("r", 0, 0, 6, fast), ("r", 0, 1, 6, slow)])
    rows = {(row["step"], row["layer"]): row for table in tables for row in table.to_pylist()}
    for layer, expected in enumerate(slow.rows):
        got = rows[(0, layer)]
        assert (got["kv_bytes"], got["aliased"], got["k_bytes"], got["v_bytes"]) == (expected[9], expected[10],
                                                                                         expected[7], expected[8])
        assert tuple(got["k_shape"]) == tuple(expected[3]) and got["stored_tokens"] == expected[11]
        assert got["cache_layer_class"] == "DynamicLayer" and got["k_dtype"] == "float32"
    assert [rows[(0, i)]["aliased"] for i in range(5)] == [True, True, False, False, False]
    assert totals[(0, 0)] == totals[(0, 1)] == (slow.kv_bytes, slow.logical_bytes)
    assert fast.kv_bytes == slow.kv_bytes and fast.logical_bytes == slow.logical_bytes


def test_static_layers_report_capacity_and_latent_layers_are_detected() -> None:
    StaticLayer = getattr(cache_utils, "StaticLayer", None)
    if StaticLayer is None:
        pytest.skip("no StaticLayer in this transformers release")
    static = StaticLayer.__new__(StaticLayer)
    static.keys, static.values = torch.zeros(1, 2, 32, 8), torch.zeros(1, 2, 32, 8)
    latent = _dynamic(torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 4))  # MLA: c_kv and k_pe
    layout = ModelLayout("test", 2, ("full_attention", "full_attention"), None, 16, "eager", "float32", "cpu", ())
    fast = measure_cache(_Cache([static, latent]), layout, 9)
    assert isinstance(fast, FastStep)
    (table,), _ = expand_steps([("r", 0, 3, 9, fast)])
    first, second = table.to_pylist()
    assert (first["stored_tokens"], first["capacity_tokens"], first["aliased"]) == (9, 32, False)
    assert (second["layer_type"], second["stored_tokens"], second["capacity_tokens"]) == ("latent", 9, None)
