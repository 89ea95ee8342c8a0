"""Storage spans: aliasing counted once, views, static zeros that are equal but not aliased."""

from __future__ import annotations

import pytest
import torch
from recorder_helpers import unique_bytes

from kvscope.recorder.measure import measure_cache
from kvscope.recorder.model_layout import ModelLayout
from kvscope.recorder.storage import tensor_span, union_bytes

LAYOUT = ModelLayout("test", 2, ("full_attention", "full_attention"), None, None, "eager", "float32", "cpu", ())


def test_span_of_a_strided_view_covers_its_extent() -> None:
    base = torch.zeros(2, 3, 10, 4)
    view = base[:, :, -3:, :]  # a sliding window kept as a view
    _, start, end = tensor_span(view)
    assert start == (7 * 4) * 4
    assert end - start == unique_bytes([view])
    assert end - start > view.numel() * view.element_size()  # the extent pins the dropped rows between heads


def test_union_counts_overlap_once() -> None:
    key = (0, 1)
    assert union_bytes([(key, 0, 10), (key, 5, 20), ((0, 2), 0, 7), (key, 30, 31)]) == 20 + 7 + 1


class _Layer:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers


def test_k_and_v_the_same_tensor_are_counted_once() -> None:
    shared = torch.randn(1, 1, 6, 8)  # DeepSeek-V4 style: self.values = self.keys
    measured = measure_cache(((shared, shared), (torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8))), LAYOUT, 6)
    first = measured.rows[0]
    assert first[9] == shared.nbytes  # kv_bytes
    assert first[7] == first[8] == shared.nbytes  # logical k_bytes and v_bytes each count it
    assert first[10] is True  # aliased
    assert measured.rows[1][10] is False
    assert measured.kv_bytes == shared.nbytes + 2 * shared.nbytes
    assert measured.logical_bytes == 4 * shared.nbytes


def test_views_of_a_fused_projection_count_the_projection_extent() -> None:
    qkv = torch.randn(1, 6, 3, 2, 8)  # GPT-NeoX style fused output: (..., q|k|v, heads, dim)
    keys, values = qkv[:, :, 1], qkv[:, :, 2]
    measured = measure_cache(((keys, values),), LAYOUT, 6)
    assert measured.rows[0][9] == unique_bytes([keys, values])
    assert measured.rows[0][10] is True  # interleaved views share bytes of one storage


def test_zero_initialised_static_k_and_v_are_not_aliased() -> None:
    keys, values = torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8)
    assert torch.equal(keys, values)
    measured = measure_cache(_Cache([_Layer(keys, values)]), LAYOUT, 3)
    assert measured.rows[0][10] is False
    assert measured.kv_bytes == 2 * keys.nbytes


def test_a_layer_shared_by_two_layers_counts_once_per_step() -> None:
    keys, values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    measured = measure_cache(_Cache([_Layer(keys, values), _Layer(keys, values)]), LAYOUT, 5)
    assert [row[9] for row in measured.rows] == [2 * keys.nbytes] * 2
    assert measured.kv_bytes == 2 * keys.nbytes


def test_unknown_layer_classes_are_scanned_for_tensors() -> None:
    class FutureLayer:
        def __init__(self) -> None:
            self.compressed_key_states = torch.randn(1, 1, 4, 16)
            self.value_pages = [torch.randn(1, 1, 4, 8)]
            self.note = "not a tensor"

    measured = measure_cache(_Cache([FutureLayer()]), LAYOUT, 4)  # type: ignore[list-item]
    row = measured.rows[0]
    assert row[2] == "FutureLayer" and row[3] == (1, 1, 4, 16) and row[4] == (1, 1, 4, 8)
    assert measured.kv_bytes == 4 * 16 * 4 + 4 * 8 * 4


def test_dummy_layers_are_skipped() -> None:
    class DummyLayer:
        def __init__(self) -> None:
            self.keys = self.values = None

    keys = torch.randn(1, 1, 3, 4)
    measured = measure_cache(_Cache([_Layer(keys, keys.clone()), DummyLayer()]), LAYOUT, 3)  # type: ignore[list-item]
    assert [row[0] for row in measured.rows] == [0]


@pytest.mark.parametrize("batch", [1, 3])
def test_legacy_tuple_and_fused_tensor_layers(batch: int) -> None:
    fused = torch.randn(batch, 7, 32)  # GPTBigCode: one K‖V tensor per layer
    measured = measure_cache((fused, fused.clone()), LAYOUT, 7)
    assert [row[9] for row in measured.rows] == [fused.nbytes, fused.nbytes]
    assert all(row[10] for row in measured.rows)
    assert measured.kv_bytes == 2 * fused.nbytes


def test_v5_indexed_and_linear_attention_layers() -> None:
    cache_utils = pytest.importorskip("transformers.cache_utils")
    indexed_cls = getattr(cache_utils, "DynamicIndexedLayer", None)
    linear_cls = getattr(cache_utils, "LinearAttentionLayer", None)
    if indexed_cls is None or linear_cls is None:
        pytest.skip("this transformers has no DynamicIndexedLayer/LinearAttentionLayer (5.11+ / 5.5+)")
    indexed = indexed_cls()
    indexed.keys, indexed.values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    indexed.indexer_keys = torch.randn(1, 5, 4)
    linear = linear_cls()
    linear.conv_states[0] = torch.randn(1, 16, 3)
    linear.recurrent_states[0] = torch.randn(1, 2, 8, 8)
    measured = measure_cache(_Cache([indexed, linear]), LAYOUT, 5)
    rows = {row[0]: row for row in measured.rows}
    assert rows[0][2] == indexed_cls.__name__ and rows[0][9] == 2 * indexed.keys.nbytes + indexed.indexer_keys.nbytes
    assert rows[1][2] == linear_cls.__name__ and rows[1][9] == 16 * 3 * 4 + 2 * 8 * 8 * 4
    assert measured.kv_bytes == rows[0][9] + rows[1][9]
