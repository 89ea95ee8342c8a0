"""The hook's fast path (raw facts, expanded in batches) agrees with the general walk exactly."""

from __future__ import annotations

import pytest
import torch
from recorder_helpers import CacheOfLayers as _Cache
from recorder_helpers import dynamic_layer as _dynamic

from kvscope.recorder.layer_rows import expand_steps
from kvscope.recorder.measure import FastStep, StepMeasure, measure_cache
from kvscope.recorder.model_layout import ModelLayout

cache_utils = pytest.importorskip("transformers.cache_utils")
DynamicLayer = getattr(cache_utils, "DynamicLayer", None)
pytestmark = pytest.mark.skipif(DynamicLayer is None, reason="this transformers release has no cache layer classes")


class _Scanned:
    """An unknown layer class: measured by the general walk (vars scanned for tensors)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


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


def _expanded(batch: list) -> tuple[dict, dict]:
    tables, totals = expand_steps(batch)
    return {(row["step"], row["layer"]): row for table in tables for row in table.to_pylist()}, totals


def _assert_same_rows(fast: FastStep, slow: StepMeasure) -> None:
    rows, totals = _expanded([("r", 0, 0, 6, fast), ("r", 0, 1, 6, slow)])
    assert totals[(0, 0)] == totals[(0, 1)] == (slow.kv_bytes, slow.logical_bytes)
    assert fast.kv_bytes == slow.kv_bytes and fast.logical_bytes == slow.logical_bytes
    assert fast.layer_count == slow.layer_count
    compared = ("layer", "k_shape", "v_shape", "k_bytes", "v_bytes", "kv_bytes", "aliased", "stored_tokens",
                "capacity_tokens", "k_dtype", "v_dtype", "layer_type")
    for (step, layer), got in rows.items():
        if step == 0:
            expected = rows[(1, layer)]
            assert {k: got[k] for k in compared} == {k: expected[k] for k in compared}, layer


def test_layers_of_mixed_ranks_and_without_values_decode_record_by_record() -> None:
    """Records of different widths (a 3-D layer, a K-only layer, an empty layer) take the per-record
    decoder and still agree with the general walk."""
    cases: list[tuple[torch.Tensor, torch.Tensor | None]] = [
        (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)),
        (torch.randn(2, 6, 8), torch.randn(2, 6, 8)),  # 3-D
        (torch.randn(1, 2, 6, 8, dtype=torch.float16), None),  # keys only (values shared or absent)
        (torch.empty(1, 2, 0, 8), torch.empty(1, 2, 0, 8)),  # nothing stored yet
        (torch.randn(1, 2, 6, 8).transpose(1, 2)[:, :0], torch.randn(1, 2, 6, 8)),  # empty non-contiguous view
    ]
    layout = ModelLayout("test", len(cases), ("full_attention",) * len(cases), None, None, "eager", "float32", "cpu", ())
    fast = measure_cache(_Cache([_dynamic(k, v) for k, v in cases]), layout, 6)
    slow = measure_cache(_Cache([_Scanned(k, v) if v is not None else _ScannedKeys(k) for k, v in cases]), layout, 6)
    assert isinstance(fast, FastStep)
    _assert_same_rows(fast, slow)
    rows, _ = _expanded([("r", 0, 0, 6, fast)])
    assert rows[(0, 2)]["v_shape"] == [] and rows[(0, 2)]["v_bytes"] == 0 and rows[(0, 2)]["k_dtype"] == "float16"
    assert rows[(0, 2)]["k_bytes"] == 1 * 2 * 6 * 8 * 2
    assert rows[(0, 1)]["stored_tokens"] == 6 and rows[(0, 3)]["kv_bytes"] == 0


class _ScannedKeys:
    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys


def test_layers_not_yet_filled_are_skipped_and_a_batch_keeps_steps_apart() -> None:
    filled = [_dynamic(torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)) for n in (3, 4)]
    empty = DynamicLayer.__new__(DynamicLayer)
    empty.keys = empty.values = None  # lazy init: no tensors before the first update
    layout = ModelLayout("test", 3, ("full_attention",) * 3, None, None, "eager", "float32", "cpu", ())
    steps = []
    for step in range(3):
        layers = [filled[0], empty, filled[1]]
        steps.append(("r", 0, step, 4 + step, measure_cache(_Cache(layers), layout, 4 + step)))
        for layer in filled:  # the next step appends one token to every filled layer
            layer.keys = torch.cat([layer.keys, torch.randn(1, 2, 1, 8)], dim=-2)
            layer.values = torch.cat([layer.values, torch.randn(1, 2, 1, 8)], dim=-2)
    rows, totals = _expanded(steps)
    assert sorted(rows) == [(s, layer) for s in range(3) for layer in (0, 2)]
    assert [rows[(s, 0)]["stored_tokens"] for s in range(3)] == [3, 4, 5]
    assert [rows[(s, 2)]["k_shape"] for s in range(3)] == [[1, 2, 4, 8], [1, 2, 5, 8], [1, 2, 6, 8]]
    # unique bytes of step s: K and V of (3 + s) and (4 + s) tokens, 2 heads x 8 dims x 4 bytes
    assert [totals[(0, s)][0] for s in range(3)] == [2 * (7 + 2 * s) * 2 * 8 * 4 for s in range(3)]


def test_random_layouts_agree_with_the_general_walk() -> None:
    generator = torch.Generator().manual_seed(7)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
    for trial in range(25):
        cases: list[tuple[torch.Tensor, torch.Tensor]] = []
        pool: list[torch.Tensor] = []
        count = int(torch.randint(1, 7, (1,), generator=generator))
        for _ in range(count):
            choice = int(torch.randint(0, 5, (1,), generator=generator))
            dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=generator))]
            tokens = int(torch.randint(0, 9, (1,), generator=generator))
            base = torch.ones(1, 3, tokens + 4, 2, 8, dtype=dtype)
            if choice == 0:  # separate K and V
                pair = (torch.ones(1, 3, tokens, 8, dtype=dtype), torch.ones(1, 3, tokens, 8, dtype=dtype))
            elif choice == 1:  # views of one fused buffer
                pair = (base[:, :, :tokens, 0], base[:, :, :tokens, 1])
            elif choice == 2:  # a window into a longer buffer
                pair = (base[:, :, 2:2 + tokens, 0], base[:, :, 4:4 + tokens, 0])
            elif choice == 3 and pool:  # shares an earlier layer's tensors
                pair = (pool[-2], pool[-1])
            else:  # K and V the same tensor
                same = torch.ones(1, 3, tokens, 8, dtype=dtype)
                pair = (same, same)
            pool.extend(pair)
            cases.append(pair)
        layout = ModelLayout("test", count, ("full_attention",) * count, None, None, "eager", "float32", "cpu", ())
        fast = measure_cache(_Cache([_dynamic(k, v) for k, v in cases]), layout, 9)
        slow = measure_cache(_Cache([_Scanned(k, v) for k, v in cases]), layout, 9)
        assert isinstance(fast, FastStep), trial
        _assert_same_rows(fast, slow)


def test_a_pickled_step_keeps_its_facts_and_one_plan_but_never_its_sample_tensors() -> None:
    import pickle

    cases = _cases()
    layout = ModelLayout("test", len(cases), ("full_attention",) * len(cases), None, None, "eager", "float32", "cpu", ())
    cache = _Cache([_dynamic(k, v) for k, v in cases])
    first = measure_cache(cache, layout, 6, sample_layers={0})
    second = measure_cache(cache, layout, 6)
    assert isinstance(first, FastStep) and first.sample_tensors
    got_first, got_second = pickle.loads(pickle.dumps([first, second], protocol=pickle.HIGHEST_PROTOCOL))
    assert got_first.facts == first.facts and got_first.plan == first.plan
    assert got_first.plan is got_second.plan  # one plan per hand-over, not one per step
    assert got_first.sample_tensors is None
    assert (got_first.kv_bytes, got_first.logical_bytes) == (first.kv_bytes, first.logical_bytes)
