"""Turn one step's cache into layer rows: shapes, dtypes, logical and unique bytes, tokens.

This is the recorder's hot path (once per forward pass, over every layer). Layers of the common
kinds (``.keys``/``.values`` tensors in ``cache.layers``) take a direct route that reads each
tensor's facts once; every other container goes through `cache_walk.iter_layers`. Rows are plain
tuples; the writer thread expands them into columns later.
"""

from __future__ import annotations

import weakref
from collections.abc import Container
from typing import Any

import torch

from kvscope.recorder.cache_walk import KIND_PLAIN, KIND_STATIC, LayerTensors, iter_layers, layer_kind, unwrap_container
from kvscope.recorder.facts import (
    CONTIGUOUS,
    LATENT,
    LAYER_FIELDS,
    SHAPE_END,
    Fact,
    FastStep,
    LayerPlan,
    StepMeasure,
    decode_facts,
)
from kvscope.recorder.model_layout import ModelLayout
from kvscope.recorder.storage import Span, dtype_name, spans_overlap, tensor_span, union_bytes
from kvscope.schema.layer_types import RECURRENT

__all__ = ["CONTIGUOUS", "LAYER_FIELDS", "SHAPE_END", "Fact", "FastStep", "LayerPlan", "StepMeasure", "decode_facts",
           "measure_cache"]

_dtype_names: dict[torch.dtype, str] = {}


def _dtype(dtype: torch.dtype) -> str:
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = dtype_name(dtype)
    return name


def _layer_row(out: StepMeasure, layout: ModelLayout, seq_len: int, index: int, holder: str, keys: torch.Tensor,
               values: torch.Tensor | None, k_spans: list[Span], v_spans: list[Span], k_bytes: int, v_bytes: int,
               extra_spans: list[Span], preallocated: bool, quantized: bool, walked_type: str | None = None) -> None:
    k_shape = tuple(keys.shape)
    if walked_type is None:
        layer_type = layout.layer_type(index)
    elif walked_type == RECURRENT:  # state alone: `ssm` in a state-space model
        layer_type = layout.state_type
    else:
        layer_type = walked_type
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
    out.spans += k_spans + v_spans + extra_spans
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
               k_bytes, v_bytes, [tensor_span(t) for t in entry.extras], entry.preallocated, entry.quantized,
               entry.layer_type)


# Plans per cache object (a generation reuses one), valid while it holds the same layers list.
# Weak keys: a plan never keeps a cache (or its tensors) alive.
_plans: weakref.WeakKeyDictionary[Any, tuple[int, int, LayerPlan | None]] = weakref.WeakKeyDictionary()


# The last plan looked up, checked first: a generation asks about the same cache every step, and
# calling a weak reference is cheaper than a WeakKeyDictionary lookup (which creates one).
_last_plan: list[Any] = [None, None]  # [weakref to the container, (id(layers), len(layers), plan)]


def _plan(container: Any, layers: list, layout: ModelLayout) -> LayerPlan | None:
    last_ref, last = _last_plan
    if last_ref is not None and last_ref() is container and last[0] == id(layers) and last[1] == len(layers):
        return last[2]
    try:
        cached = _plans.get(container)
    except TypeError:  # not weak-referenceable: plan every step
        cached = None
    if cached is not None and cached[0] == id(layers) and cached[1] == len(layers):
        _last_plan[:] = [weakref.ref(container), cached]
        return cached[2]
    holders, static, k_dtypes, v_dtypes, k_sizes, v_sizes = [], [], [], [], [], []
    plan: LayerPlan | None = None
    complete = True
    for layer in layers:
        kind, extras = layer_kind(type(layer))
        if kind not in (KIND_PLAIN, KIND_STATIC) or extras:
            break
        holders.append(type(layer).__name__)
        static.append(kind == KIND_STATIC)
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        complete = complete and isinstance(keys, torch.Tensor)
        k_dtypes.append(_dtype(keys.dtype) if isinstance(keys, torch.Tensor) else "")
        k_sizes.append(keys.element_size() if isinstance(keys, torch.Tensor) else 0)
        v_dtypes.append(_dtype(values.dtype) if isinstance(values, torch.Tensor) else k_dtypes[-1])
        v_sizes.append(values.element_size() if isinstance(values, torch.Tensor) else k_sizes[-1])
    else:
        types = tuple(layout.layer_type(i) for i in range(len(layers)))
        plan = LayerPlan(tuple(holders), tuple(static), types, tuple(k_dtypes), tuple(v_dtypes), layout.kv_lora_rank,
                         tuple(k_sizes), tuple(v_sizes))
    if plan is None or complete:  # a layer not yet filled (lazy init): plan again next step
        try:
            _plans[container] = entry = (id(layers), len(layers), plan)
            _last_plan[:] = [weakref.ref(container), entry]
        except TypeError:
            pass
    return plan


def _extent(tensor: torch.Tensor, start: int) -> int:
    """End address of a non-contiguous tensor's elements (its storage span)."""
    if tensor.numel() == 0:
        return start
    last = 0
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        last += (size - 1) * stride
    return start + (last + 1) * tensor.element_size()


def _capture_fast(container: Any, layers: list, layout: ModelLayout,
                  sample_layers: Container[int] | None, native: Any = None) -> FastStep | None:
    """Raw facts of `cache.layers` when every layer is a plain/static one; None if not.

    With the native module, one C call (it answers None for anything unusual); otherwise one tight
    loop with locals only: this is most of the recorder's per-step time.
    """
    plan = _plan(container, layers, layout)
    if plan is None:
        return None
    captured = None
    if native is not None:
        try:
            captured = native.capture(layers)
        except Exception:  # noqa: BLE001 - the fast path gives up on this step; Python reads the same facts
            captured = None
    step = FastStep(plan, captured) if captured is not None else FastStep(plan, _python_facts(layers))
    if sample_layers is not None:
        step.sample_tensors = []
        rank = plan.kv_lora_rank
        tensor = torch.Tensor
        for index, layer in enumerate(layers):
            if index in sample_layers and isinstance(layer.keys, tensor):
                shape = layer.keys.shape
                latent = rank is not None and len(shape) == 4 and shape[1] == 1 and shape[-1] == rank
                _add_samples(step.sample_tensors, index, layer.keys, layer.values, latent)
    return step


def _python_facts(layers: list) -> list[int]:
    """The fact records of plain/static layers (`facts.SHAPE_END` describes them)."""
    facts: list[int] = []
    extend = facts.extend
    tensor = torch.Tensor
    end = SHAPE_END
    for index, layer in enumerate(layers):
        keys = layer.keys
        if not isinstance(keys, tensor):
            continue
        values = layer.values
        k_start = keys.data_ptr()
        if values is not None:
            v_start = values.data_ptr()
            extend((index, k_start, keys.is_contiguous() or _extent(keys, k_start),
                    v_start, values.is_contiguous() or _extent(values, v_start),
                    *keys.shape, end, *values.shape, end))
        else:
            extend((index, k_start, keys.is_contiguous() or _extent(keys, k_start), 0, 0, *keys.shape, end, end))
    return facts


def _add_samples(out: list[tuple[int, str, torch.Tensor]], index: int, keys: torch.Tensor,
                 values: torch.Tensor | None, latent: bool) -> None:
    # MLA latent layers: keys hold c_kv ("latent"), values the decoupled RoPE key k_pe ("k").
    out.append((index, "latent" if latent else "k", keys))
    if values is not None and values is not keys:
        out.append((index, "k" if latent else "v", values))


def measure_cache(cache: Any, layout: ModelLayout, seq_len: int,
                  sample_layers: Container[int] | None = None, native: Any = None) -> StepMeasure | FastStep:
    """Measure every layer of `cache`; with `sample_layers`, also hand back their K/V to copy.

    Caches whose layers are all plain/static come back as raw facts (`FastStep`), the rest as rows.
    `native` is the C++ fast path (`recorder/native`), or None to capture in Python.
    """
    container = unwrap_container(cache)
    layers = getattr(container, "layers", None) if container is cache else None  # EncoderDecoderCache: the walk
    if isinstance(layers, list) and layers and not isinstance(layers[0], torch.Tensor):
        fast = _capture_fast(container, layers, layout, sample_layers, native)
        if fast is not None:
            return fast
    out = StepMeasure()
    for entry in iter_layers(cache):
        _measure_entry(out, layout, seq_len, entry)
        if sample_layers is not None and entry.layer in sample_layers and not entry.quantized:
            _add_samples(out.sample_tensors, entry.layer, entry.keys, entry.values, out.rows[-1][1] == LATENT)
    return out
