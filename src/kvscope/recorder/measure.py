"""Turn one step's cache into layer rows: shapes, dtypes, logical and unique bytes, tokens.

This is the recorder's hot path (once per forward pass, over every layer). Layers of the common
kinds (``.keys``/``.values`` tensors in ``cache.layers``) take a direct route that reads each
tensor's facts once; every other container goes through `cache_walk.iter_layers`. Rows are plain
tuples; the writer thread expands them into columns later.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.recorder.cache_walk import KIND_PLAIN, KIND_STATIC, LayerTensors, iter_layers, layer_kind, unwrap_container
from kvscope.recorder.model_layout import LATENT, ModelLayout
from kvscope.recorder.storage import Span, StorageKey, dtype_name, spans_overlap, tensor_span, union_bytes

# Order of the fields in a layer row tuple (after run_id/gen_id/step, added by the step recorder).
LAYER_FIELDS = (
    "layer", "layer_type", "cache_layer_class", "k_shape", "v_shape", "k_dtype", "v_dtype",
    "k_bytes", "v_bytes", "kv_bytes", "aliased", "stored_tokens", "capacity_tokens",
)

_dtype_names: dict[torch.dtype, str] = {}


def _dtype(dtype: torch.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype_name(dtype)
    return name


@dataclass
class StepMeasure:
    """One step's layer rows and totals."""

    rows: list[tuple] = field(default_factory=list)
    logical_bytes: int = 0
    sample_tensors: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    # Spans per storage; while no storage has two spans, the total is a plain sum.
    _by_storage: dict[StorageKey, list[tuple[int, int]]] = field(default_factory=dict)
    _plain_total: int = 0
    _overlapping: bool = False

    def add_spans(self, spans: list[Span]) -> None:
        by_storage = self._by_storage
        for key, start, end in spans:
            ranges = by_storage.get(key)
            if ranges is None:
                by_storage[key] = [(start, end)]
                self._plain_total += end - start
            else:
                ranges.append((start, end))
                self._overlapping = True

    @property
    def kv_bytes(self) -> int:
        """All layers' unique bytes: spans merged per storage, so shared layers count once."""
        if not self._overlapping:
            return self._plain_total
        return union_bytes((key, s, e) for key, ranges in self._by_storage.items() for s, e in ranges)


def _layer_row(out: StepMeasure, layout: ModelLayout, seq_len: int, index: int, holder: str, keys: torch.Tensor,
               values: torch.Tensor | None, k_spans: list[Span], v_spans: list[Span], k_bytes: int, v_bytes: int,
               extra_spans: list[Span], preallocated: bool, quantized: bool) -> None:
    k_shape = tuple(keys.shape)
    layer_type = layout.layer_type(index)
    rank = layout.kv_lora_rank
    if rank is not None and len(k_shape) == 4 and k_shape[1] == 1 and k_shape[-1] == rank:
        layer_type = LATENT
    capacity = None
    if quantized:
        stored = seq_len  # every token is kept, quantized or in the residual
    elif len(k_shape) >= 2:
        stored = k_shape[-2]
        if preallocated:
            capacity = stored
            stored = min(seq_len, capacity)
    else:
        stored = k_shape[0] if k_shape else 0
    # Unique bytes of the layer: K and V alone when they sit in different storages (the usual case).
    if len(k_spans) == 1 and len(v_spans) == 1 and not extra_spans and k_spans[0][0] != v_spans[0][0]:
        kv_bytes, aliased = (k_spans[0][2] - k_spans[0][1]) + (v_spans[0][2] - v_spans[0][1]), False
    else:
        kv_bytes = union_bytes(k_spans + v_spans + extra_spans)
        aliased = bool(v_spans) and spans_overlap(k_spans, v_spans)
    out.rows.append((
        index, layer_type, holder, k_shape, tuple(values.shape) if values is not None else (),
        _dtype(keys.dtype), _dtype(values.dtype if values is not None else keys.dtype),
        k_bytes, v_bytes, kv_bytes, aliased, stored, capacity,
    ))
    out.add_spans(k_spans)
    out.add_spans(v_spans)
    out.add_spans(extra_spans)
    out.logical_bytes += k_bytes + v_bytes


def _measure_entry(out: StepMeasure, layout: ModelLayout, seq_len: int, entry: LayerTensors) -> None:
    keys, values = entry.keys, entry.values
    if entry.quantized:
        k_spans = [tensor_span(t) for t in entry.key_parts]
        v_spans = [tensor_span(t) for t in entry.value_parts]
        k_bytes = sum(t.nbytes for t in entry.key_parts)
        v_bytes = sum(t.nbytes for t in entry.value_parts)
    else:
        k_spans = [tensor_span(keys)]
        v_spans = [tensor_span(values)] if values is not None else []
        k_bytes = keys.nbytes
        v_bytes = values.nbytes if values is not None else 0
    _layer_row(out, layout, seq_len, entry.layer, entry.holder_class, keys, values, k_spans, v_spans,
               k_bytes, v_bytes, [tensor_span(t) for t in entry.extras], entry.preallocated, entry.quantized)


def _fast_layers(out: StepMeasure, layout: ModelLayout, seq_len: int, layers: list,
                 sample_layers: Container[int] | None) -> bool:
    """Measure `cache.layers` directly when every layer is a plain/static one; False if not.

    One tight loop with locals only: this is most of the recorder's per-step time.
    """
    kinds = [layer_kind(type(layer)) for layer in layers]
    if any(kind not in (KIND_PLAIN, KIND_STATIC) or extras for kind, extras in kinds):
        return False
    layer_types = layout.layer_types
    n_types = len(layer_types)
    rank = layout.kv_lora_rank
    rows = out.rows
    by_storage = out._by_storage
    plain_total = 0
    logical = 0
    tensor = torch.Tensor
    for index, layer in enumerate(layers):
        keys = layer.keys
        if not isinstance(keys, tensor):
            continue
        values = layer.values
        k_ptr = keys.untyped_storage().data_ptr()
        k_key = (keys.get_device(), k_ptr)
        k_start = keys.data_ptr() - k_ptr
        k_bytes = keys.nbytes
        k_end = k_start + k_bytes if keys.is_contiguous() else tensor_span(keys)[2]
        k_shape = keys.shape
        if values is not None:
            v_ptr = values.untyped_storage().data_ptr()
            v_key = (values.get_device(), v_ptr)
            v_start = values.data_ptr() - v_ptr
            v_bytes = values.nbytes
            v_end = v_start + v_bytes if values.is_contiguous() else tensor_span(values)[2]
            v_shape = values.shape
            v_dtype = values.dtype
        else:
            v_key, v_start, v_end, v_bytes, v_shape, v_dtype = k_key, 0, 0, 0, (), keys.dtype
        if k_key != v_key or v_end == v_start:
            kv_bytes = (k_end - k_start) + (v_end - v_start)
            aliased = False
        else:
            kv_bytes = union_bytes([(k_key, k_start, k_end), (v_key, v_start, v_end)])
            aliased = k_start < v_end and v_start < k_end
        layer_type = layer_types[index] if index < n_types else "full_attention"
        if rank is not None and len(k_shape) == 4 and k_shape[1] == 1 and k_shape[-1] == rank:
            layer_type = LATENT
        stored = k_shape[-2] if len(k_shape) >= 2 else (k_shape[0] if k_shape else 0)
        capacity = None
        if kinds[index][0] == KIND_STATIC:
            capacity = stored
            stored = min(seq_len, capacity)
        rows.append((index, layer_type, type(layer).__name__, k_shape, v_shape, _dtype(keys.dtype), _dtype(v_dtype),
                     k_bytes, v_bytes, kv_bytes, aliased, stored, capacity))
        for key, start, end in ((k_key, k_start, k_end), (v_key, v_start, v_end)):
            if end == start:
                continue
            ranges = by_storage.get(key)
            if ranges is None:
                by_storage[key] = [(start, end)]
                plain_total += end - start
            else:
                ranges.append((start, end))
                out._overlapping = True
        logical += k_bytes + v_bytes
        if sample_layers is not None and index in sample_layers:
            _add_samples(out, index, keys, values)
    out._plain_total += plain_total
    out.logical_bytes += logical
    return True


def _add_samples(out: StepMeasure, index: int, keys: torch.Tensor, values: torch.Tensor | None) -> None:
    latent = out.rows[-1][1] == LATENT
    # MLA latent layers: keys hold c_kv ("latent"), values the decoupled RoPE key k_pe ("k").
    out.sample_tensors.append((index, "latent" if latent else "k", keys))
    if values is not None and values is not keys:
        out.sample_tensors.append((index, "k" if latent else "v", values))


def measure_cache(cache: Any, layout: ModelLayout, seq_len: int,
                  sample_layers: Container[int] | None = None) -> StepMeasure:
    """Measure every layer of `cache`; with `sample_layers`, also hand back their K/V to copy."""
    out = StepMeasure()
    layers = getattr(unwrap_container(cache), "layers", None)
    if isinstance(layers, list) and layers and not isinstance(layers[0], torch.Tensor):
        if _fast_layers(out, layout, seq_len, layers, sample_layers):
            return out
        out = StepMeasure()
    for entry in iter_layers(cache):
        _measure_entry(out, layout, seq_len, entry)
        if sample_layers is not None and entry.layer in sample_layers and not entry.quantized:
            _add_samples(out, entry.layer, entry.keys, entry.values)
    return out
