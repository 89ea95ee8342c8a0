"""Find each layer's K/V tensors in whatever cache container a transformers version produced.

Containers handled (see ``shared/design/transformers-caches.md``): legacy tuples of ``(k, v)``
(and GPTBigCode's fused K‖V tensor), caches with ``key_cache``/``value_cache`` lists (≤4.53:
Dynamic, Static, Hybrid, SlidingWindow, Offloaded, Quantized with ``_quantized_key_cache``),
caches with ``.layers`` (4.54+: Dynamic/Static/sliding/quantized/indexed/linear-attention/Dummy
layers), ``EncoderDecoderCache`` (its self-attention cache) and, for anything else, a scan of
``vars(layer)`` for tensors. The walk returns tensors only to its caller, inside the hook: nothing
here keeps a reference once the step's rows are built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.recorder.storage import flatten_tensors

# Container classes of the key_cache era whose tensors are preallocated to a fixed length.
PREALLOCATED_CONTAINERS = frozenset(
    {"StaticCache", "HybridCache", "HybridChunkedCache", "SlidingWindowCache", "OffloadedStaticCache"}
)
# Per-layer tensors beyond keys/values that newer layer classes keep (indexer keys of DSA models,
# linear-attention states): counted in the layer's unique bytes.
EXTRA_TENSOR_ATTRS = ("indexer_keys", "conv_states", "recurrent_states")

KIND_PLAIN = "plain"  # .keys / .values
KIND_STATIC = "static"  # .keys / .values preallocated, written in place
KIND_QUANTIZED = "quantized"  # _quantized_keys/_quantized_values + residual .keys/.values
KIND_SKIP = "skip"  # DummyLayer: holds nothing (a shared layer's consumer, or no attention)
KIND_SCAN = "scan"  # unknown: scan vars(layer) for tensors


@dataclass
class LayerTensors:
    """One layer's cache tensors as found in the container (valid only inside the hook)."""

    layer: int
    holder_class: str
    keys: torch.Tensor
    values: torch.Tensor | None
    key_parts: list[torch.Tensor] = field(default_factory=list)  # quantized: packed data, scales, residual
    value_parts: list[torch.Tensor] = field(default_factory=list)
    extras: list[torch.Tensor] = field(default_factory=list)
    preallocated: bool = False
    quantized: bool = False


_kind_by_type: dict[type, tuple[str, tuple[str, ...]]] = {}


def layer_kind(layer_type: type) -> tuple[str, tuple[str, ...]]:
    """Classify a cache-layer class once (by the names in its MRO, so no version-specific import)."""
    cached = _kind_by_type.get(layer_type)
    if cached is not None:
        return cached
    mro = {cls.__name__ for cls in layer_type.__mro__}
    if "DummyLayer" in mro:
        kind = KIND_SKIP
    elif "BaseQuantizedLayer" in mro or "QuantizedLayer" in mro or hasattr(layer_type, "_quantize"):
        kind = KIND_QUANTIZED
    elif "StaticLayer" in mro:
        kind = KIND_STATIC
    elif "DynamicLayer" in mro or "CacheLayerMixin" in mro or "LinearAttentionCacheLayerMixin" in mro:
        kind = KIND_PLAIN
    else:
        kind = KIND_SCAN
    has_extras = "LinearAttentionCacheLayerMixin" in mro or "Indexed" in layer_type.__name__
    extras = EXTRA_TENSOR_ATTRS if has_extras else ()
    _kind_by_type[layer_type] = (kind, extras)
    return kind, extras


# Cache classes seen without a `self_attention_cache`: skip the lookup (a miss raises and catches
# an AttributeError, and this runs every step).
_plain_cache_types: set[type] = set()


def unwrap_container(cache: Any) -> Any:
    """The self-attention cache of an EncoderDecoderCache; the cache itself otherwise."""
    kind = type(cache)
    if kind in _plain_cache_types:
        return cache
    inner = getattr(cache, "self_attention_cache", _MISSING)
    if inner is _MISSING:
        _plain_cache_types.add(kind)
        return cache
    return inner if inner is not None else cache


_MISSING = object()


def iter_layers(cache: Any) -> Iterator[LayerTensors]:
    """Each layer's tensors; layers that hold nothing (Dummy, not yet filled) are left out."""
    cache = unwrap_container(cache)
    if isinstance(cache, (tuple, list)):
        yield from _legacy_layers(cache)
        return
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and (not layers or not isinstance(layers[0], torch.Tensor)):
        yield from _layer_objects(layers)
        return
    key_cache = getattr(cache, "key_cache", None)
    if isinstance(key_cache, (list, tuple)):
        yield from _key_cache_lists(cache, key_cache)
        return
    yield from _scanned_layers(cache)


def _legacy_layers(pkv: tuple | list) -> Iterator[LayerTensors]:
    for i, entry in enumerate(pkv):
        if isinstance(entry, torch.Tensor):  # GPTBigCode: one fused K‖V tensor per layer
            yield LayerTensors(i, "tensor", entry, entry)
        elif isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], torch.Tensor):
            values = entry[1] if len(entry) > 1 and isinstance(entry[1], torch.Tensor) else None
            yield LayerTensors(i, "tuple", entry[0], values)


def _layer_objects(layers: list | tuple) -> Iterator[LayerTensors]:
    for i, layer in enumerate(layers):
        kind, extra_attrs = layer_kind(type(layer))
        if kind == KIND_SKIP:
            continue
        name = type(layer).__name__
        extras = [t for a in extra_attrs for t in flatten_tensors(getattr(layer, a, None))]
        if kind == KIND_QUANTIZED:
            found = _quantized_layer(i, name, getattr(layer, "_quantized_keys", None),
                                     getattr(layer, "_quantized_values", None),
                                     getattr(layer, "keys", None), getattr(layer, "values", None))
            if found is not None:
                yield found
            continue
        if kind == KIND_SCAN:
            found = _scan_object(i, name, layer)
            if found is not None:
                yield found
            continue
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor):
            if extras:  # a linear-attention layer: its states are what it caches
                yield LayerTensors(i, name, extras[0], extras[1] if len(extras) > 1 else None, extras=extras[2:])
            continue
        yield LayerTensors(i, name, keys, getattr(layer, "values", None), extras=extras,
                           preallocated=kind == KIND_STATIC)


def _key_cache_lists(cache: Any, key_cache: list | tuple) -> Iterator[LayerTensors]:
    name = type(cache).__name__
    value_cache = getattr(cache, "value_cache", None) or []
    preallocated = name in PREALLOCATED_CONTAINERS or any(
        c.__name__ in PREALLOCATED_CONTAINERS for c in type(cache).__mro__)
    quantized_keys = getattr(cache, "_quantized_key_cache", None)
    if quantized_keys is not None:
        quantized_values = getattr(cache, "_quantized_value_cache", None) or []
        for i, qk in enumerate(quantized_keys):
            found = _quantized_layer(
                i, name, qk, quantized_values[i] if i < len(quantized_values) else None,
                key_cache[i] if i < len(key_cache) else None, value_cache[i] if i < len(value_cache) else None)
            if found is not None:
                yield found
        return
    for i, keys in enumerate(key_cache):
        if not isinstance(keys, torch.Tensor):  # skipped layers hold [] in 4.4x caches
            continue
        values = value_cache[i] if i < len(value_cache) and isinstance(value_cache[i], torch.Tensor) else None
        yield LayerTensors(i, name, keys, values, preallocated=preallocated)


def _quantized_layer(index: int, name: str, q_keys: Any, q_values: Any, res_keys: Any,
                     res_values: Any) -> LayerTensors | None:
    key_parts = flatten_tensors(q_keys) + flatten_tensors(res_keys)
    value_parts = flatten_tensors(q_values) + flatten_tensors(res_values)
    if not key_parts:
        return None
    # The packed data (first part) stands for K/V's shape and dtype; bytes cover every part.
    return LayerTensors(index, name, key_parts[0], value_parts[0] if value_parts else None,
                        key_parts=key_parts, value_parts=value_parts, quantized=True)


def _scan_object(index: int, name: str, holder: Any) -> LayerTensors | None:
    """An unknown layer: its tensor attributes, keys-like first, values-like second."""
    named = [(attr, t) for attr, value in vars(holder).items() for t in flatten_tensors(value)]
    if not named:
        return None
    keys = next((t for a, t in named if "key" in a.lower()), named[0][1])
    values = next((t for a, t in named if "value" in a.lower()), None)
    rest = [t for _, t in named if t is not keys and t is not values]
    return LayerTensors(index, name, keys, values, extras=rest)


def _scanned_layers(cache: Any) -> Iterator[LayerTensors]:
    """A container of no known shape: lists of per-layer tensors or layer objects among its attributes."""
    for attr, value in vars(cache).items():
        if not isinstance(value, (list, tuple)) or not value:
            continue
        if all(isinstance(v, torch.Tensor) for v in value) and "key" in attr.lower():
            values = getattr(cache, attr.replace("key", "value"), None) or []
            for i, keys in enumerate(value):
                yield LayerTensors(i, type(cache).__name__, keys, values[i] if i < len(values) else None)
            return
    name = type(cache).__name__
    found = _scan_object(0, name, cache)
    if found is not None:
        yield found
