"""Turn one step's cache into layer rows: shapes, dtypes, logical and unique bytes, tokens.

This is the recorder's hot path (once per forward pass, over every layer). Layers of the common
kinds (``.keys``/``.values`` tensors in ``cache.layers``) take a direct route that reads each
tensor's facts once; every other container goes through `cache_walk.iter_layers`. Rows are plain
tuples; the writer thread expands them into columns later.
"""

from __future__ import annotations

import weakref
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kvscope.recorder.cache_walk import KIND_PLAIN, KIND_STATIC, LayerTensors, iter_layers, layer_kind, unwrap_container
from kvscope.recorder.model_layout import LATENT, ModelLayout
from kvscope.recorder.storage import (
    Span,
    StorageKey,
    covered_bytes,
    dtype_name,
    spans_overlap,
    tensor_span,
    union_bytes,
)

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
    def layer_count(self) -> int:
        return len(self.rows)

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


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer constants of one `cache.layers` list, read once per generation, not per step."""

    holders: tuple[str, ...]  # cache-layer class names
    static: tuple[bool, ...]  # preallocated (StaticLayer and subclasses)
    layer_types: tuple[str, ...]  # declared types (latent is decided per step from the shape)
    k_dtypes: tuple[str, ...]
    v_dtypes: tuple[str, ...]
    kv_lora_rank: int | None
    k_itemsizes: tuple[int, ...] = ()  # bytes per element: logical bytes are numel x itemsize
    v_itemsizes: tuple[int, ...] = ()


# A fact record in `FastStep.facts` (a flat list of ints):
#   layer, k_start, k_code, v_start, v_code, *k_shape, SHAPE_END, *v_shape, SHAPE_END
# A code is CONTIGUOUS (the tensor's span is exactly its bytes, computed later from the shape) or
# the end address of its span. A layer without values has v_start = v_code = 0 and no v dims.
SHAPE_END = -1  # dims, addresses and layer indices are never negative
CONTIGUOUS = 1  # `is_contiguous()` is True == 1; no span ends at address 1


class Fact(NamedTuple):
    """One decoded fact record (for the rare per-step readers; the writer decodes whole batches)."""

    layer: int
    k_start: int
    k_end: int
    k_bytes: int
    k_shape: tuple[int, ...]
    v_start: int
    v_end: int
    v_bytes: int
    v_shape: tuple[int, ...]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def decode_facts(flat: list[int], plan: LayerPlan) -> list[Fact]:
    """The records of one step's flat fact list, with bytes and span ends resolved."""
    facts: list[Fact] = []
    i, n = 0, len(flat)
    while i < n:
        layer, k_start, k_code, v_start, v_code = flat[i:i + 5]
        j = flat.index(SHAPE_END, i + 5)
        k_shape = tuple(flat[i + 5:j])
        m = flat.index(SHAPE_END, j + 1)
        v_shape = tuple(flat[j + 1:m])
        i = m + 1
        k_bytes = _numel(k_shape) * plan.k_itemsizes[layer]
        k_end = k_start + k_bytes if k_code == CONTIGUOUS else k_code
        if v_shape:
            v_bytes = _numel(v_shape) * plan.v_itemsizes[layer]
            v_end = v_start + v_bytes if v_code == CONTIGUOUS else v_code
        else:
            v_bytes, v_end = 0, v_code
        facts.append(Fact(layer, k_start, k_end, k_bytes, k_shape, v_start, v_end, v_bytes, v_shape))
    return facts


@dataclass(slots=True)
class FastStep:
    """One step of a cache whose layers are all plain/static: raw facts per layer, expanded into
    rows later and vectorised (`expand.py`), so the hook does as little Python as possible.

    `facts` is one flat list of ints (records described at `SHAPE_END`): ints are not tracked by
    the garbage collector, so a buffered step holds a few tracked objects rather than three per
    layer, and the recorder triggers (almost) no collections. Spans are absolute address ranges
    (storage base + offset). With CUDA's unified virtual addressing no two live allocations of a
    process share an address, on any device or the host, so the union of address ranges is the
    union of storage spans, without creating storage objects.
    """

    plan: LayerPlan
    facts: list[int]
    sample_tensors: list[tuple[int, str, torch.Tensor]] | None = None

    def decoded(self) -> list[Fact]:
        return decode_facts(self.facts, self.plan)

    @property
    def kv_bytes(self) -> int:
        facts = self.decoded()
        return covered_bytes([(f.k_start, f.k_end) for f in facts] + [(f.v_start, f.v_end) for f in facts])

    @property
    def logical_bytes(self) -> int:
        return sum(f.k_bytes + f.v_bytes for f in self.decoded())

    @property
    def layer_count(self) -> int:
        return len(self.decoded())


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
                  sample_layers: Container[int] | None) -> FastStep | None:
    """Raw facts of `cache.layers` when every layer is a plain/static one; None if not.

    One tight loop with locals only: this is most of the recorder's per-step time.
    """
    plan = _plan(container, layers, layout)
    if plan is None:
        return None
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
    step = FastStep(plan, facts)
    if sample_layers is not None:
        step.sample_tensors = []
        rank = plan.kv_lora_rank
        for index, layer in enumerate(layers):
            if index in sample_layers and isinstance(layer.keys, tensor):
                shape = layer.keys.shape
                latent = rank is not None and len(shape) == 4 and shape[1] == 1 and shape[-1] == rank
                _add_samples(step.sample_tensors, index, layer.keys, layer.values, latent)
    return step


def _add_samples(out: list[tuple[int, str, torch.Tensor]], index: int, keys: torch.Tensor,
                 values: torch.Tensor | None, latent: bool) -> None:
    # MLA latent layers: keys hold c_kv ("latent"), values the decoupled RoPE key k_pe ("k").
    out.append((index, "latent" if latent else "k", keys))
    if values is not None and values is not keys:
        out.append((index, "k" if latent else "v", values))


def measure_cache(cache: Any, layout: ModelLayout, seq_len: int,
                  sample_layers: Container[int] | None = None) -> StepMeasure | FastStep:
    """Measure every layer of `cache`; with `sample_layers`, also hand back their K/V to copy.

    Caches whose layers are all plain/static come back as raw facts (`FastStep`), the rest as rows.
    """
    container = unwrap_container(cache)
    layers = getattr(container, "layers", None)
    if isinstance(layers, list) and layers and not isinstance(layers[0], torch.Tensor):
        fast = _capture_fast(container, layers, layout, sample_layers)
        if fast is not None:
            return fast
    out = StepMeasure()
    for entry in iter_layers(cache):
        _measure_entry(out, layout, seq_len, entry)
        if sample_layers is not None and entry.layer in sample_layers and not entry.quantized:
            _add_samples(out.sample_tensors, entry.layer, entry.keys, entry.values, out.rows[-1][1] == LATENT)
    return out
