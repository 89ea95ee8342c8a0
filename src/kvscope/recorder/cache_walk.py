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

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.recorder.storage import flatten_tensors
from kvscope.schema.layer_types import CONV, CROSS_ATTENTION, RECURRENT, SSM

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
    # A type the walk knows better than the config: cross-attention KV (fixed by the encoder's length),
    # recurrent/state-space states (constant in tokens); None: the config's declared type.
    layer_type: str | None = None


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
    """Each layer's tensors; layers that hold nothing (Dummy, not yet filled) are left out.

    An `EncoderDecoderCache` gives its self-attention layers (0..n-1), then its cross-attention
    layers numbered after them (n..2n-1, layer type `cross_attention`).
    """
    inner = unwrap_container(cache)
    if inner is cache:
        yield from _container_layers(cache)
        return
    count = 0
    for entry in _container_layers(inner):
        count = max(count, entry.layer + 1)
        yield entry
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is None:
        return
    count = max(count, _layer_count(inner))
    for entry in _container_layers(cross):
        entry.layer += count
        entry.layer_type = CROSS_ATTENTION
        yield entry


def _layer_count(cache: Any) -> int:
    for attr in ("layers", "key_cache"):
        value = getattr(cache, attr, None)
        if isinstance(value, (list, tuple)):
            return len(value)
    return len(cache) if isinstance(cache, (list, tuple)) else 0


def _container_layers(cache: Any) -> Iterator[LayerTensors]:
    if isinstance(cache, (tuple, list)):
        yield from _legacy_layers(cache)
        return
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and (not layers or not isinstance(layers[0], torch.Tensor)):
        yield from _layer_objects(layers)
        return
    if isinstance(cache, ModuleStateCache):
        yield from cache.entries()
        return
    if isinstance(cache, RwkvState):
        yield from cache.entries()
        return
    key_cache = getattr(cache, "key_cache", None)
    states = _state_lists(cache)
    if isinstance(key_cache, (list, tuple)) or states:
        yield from _key_cache_lists(cache, key_cache if isinstance(key_cache, (list, tuple)) else [], states)
        return
    yield from _scanned_layers(cache)


# Per-layer state lists of 4.x caches: MambaCache / FalconMambaCache (`conv_states`, `ssm_states`
# lists), Mamba2Cache (one stacked [layers, ...] tensor each), HybridMambaAttentionDynamicCache
# (jamba, bamba, granitemoehybrid), FalconHybridMambaAttentionDynamicCache and
# Zamba2HybridDynamicCache (dicts by layer), Qwen3NextDynamicCache (`conv_states`,
# `recurrent_states`, None for attention layers), Lfm2HybridConvCache (`conv_cache`), xLSTMCache (`rnn_state`:
# per layer its C, n and m states).
STATE_LISTS = (("conv_states", CONV), ("conv_cache", CONV), ("ssm_states", SSM), ("recurrent_states", RECURRENT),
               ("rnn_state", RECURRENT))


def _state_lists(cache: Any) -> list[tuple[str, Any]]:
    found = []
    for attr, kind in STATE_LISTS:
        value = getattr(cache, attr, None)
        if isinstance(value, (list, tuple, dict)) or (isinstance(value, torch.Tensor) and value.dim() >= 2):
            found.append((kind, value))
    return found


def _state_at(states: Any, index: int) -> list[torch.Tensor]:
    if isinstance(states, dict):
        value = states.get(index)
    elif isinstance(states, torch.Tensor) or index < len(states):
        value = states[index] if index < len(states) else None
    else:
        value = None
    return [t for t in flatten_tensors(value) if t.numel()]


def _state_count(states: Any) -> int:
    if isinstance(states, dict):
        return max((k + 1 for k in states if isinstance(k, int)), default=0)
    return len(states)


def _state_entry(index: int, name: str, tensors: list[torch.Tensor], layer_type: str) -> LayerTensors:
    """A layer whose cache is recurrent state (constant in tokens): the first tensor (conv state)
    stands as K, the second (ssm / recurrent state) as V, the rest in its unique bytes."""
    return LayerTensors(index, name, tensors[0], tensors[1] if len(tensors) > 1 else None, extras=tensors[2:],
                        layer_type=layer_type)


def _legacy_layers(pkv: tuple | list) -> Iterator[LayerTensors]:
    cross: list[LayerTensors] = []
    for i, entry in enumerate(pkv):
        if isinstance(entry, torch.Tensor):  # GPTBigCode: one fused K‖V tensor per layer
            yield LayerTensors(i, "tensor", entry, entry)
        elif isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], torch.Tensor):
            values = entry[1] if len(entry) > 1 and isinstance(entry[1], torch.Tensor) else None
            yield LayerTensors(i, "tuple", entry[0], values)
            # an encoder-decoder's legacy 4-tuple (self K, self V, cross K, cross V): bart ≤4.4x
            if len(entry) == 4 and isinstance(entry[2], torch.Tensor) and isinstance(entry[3], torch.Tensor):
                cross.append(LayerTensors(len(pkv) + i, "tuple", entry[2], entry[3], layer_type=CROSS_ATTENTION))
    yield from cross


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
                recurrent = flatten_tensors(getattr(layer, "recurrent_states", None))
                yield _state_entry(i, name, [t for t in extras if t.numel()], RECURRENT if recurrent else CONV)
            continue
        yield LayerTensors(i, name, keys, getattr(layer, "values", None), extras=extras,
                           preallocated=kind == KIND_STATIC)


def _key_cache_lists(cache: Any, key_cache: list | tuple, states: list[tuple[str, Any]] = ()) -> Iterator[LayerTensors]:
    name = type(cache).__name__
    if states:
        yield from _hybrid_lists(cache, name, key_cache, states)
        return
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


def _hybrid_lists(cache: Any, name: str, key_cache: list | tuple, states: list[tuple[str, Any]]) -> Iterator[LayerTensors]:
    """A 4.x cache with state lists: per layer, its attention K/V (where it has any) with the states
    counted in its unique bytes, or the states alone as a state layer."""
    value_cache = getattr(cache, "value_cache", None) or []
    count = max([len(key_cache)] + [_state_count(v) for _, v in states])
    for i in range(count):
        keys = key_cache[i] if i < len(key_cache) else None
        held = [(kind, t) for kind, v in states for t in _state_at(v, i)]
        tensors = [t for _, t in held]
        if isinstance(keys, torch.Tensor) and keys.numel():
            values = value_cache[i] if i < len(value_cache) and isinstance(value_cache[i], torch.Tensor) else None
            yield LayerTensors(i, name, keys, values, extras=tensors)
        elif tensors:
            kinds = {kind for kind, _ in held}
            kind = SSM if SSM in kinds else RECURRENT if RECURRENT in kinds else CONV
            yield _state_entry(i, name, tensors, kind)


class RwkvState:
    """RWKV's `state`: five tensors [batch, hidden, layers] (attention x, a, b, p and feed-forward x);
    a layer's state is their slice at its index (views whose spans interleave with the other layers')."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def entries(self) -> Iterator[LayerTensors]:
        count = self.tensors[0].shape[-1] if self.tensors and self.tensors[0].dim() >= 1 else 0
        for i in range(count):
            yield _state_entry(i, "RwkvState", [t.select(-1, i) for t in self.tensors], RECURRENT)


# Tensor attributes that models keep their decoding state in on their own modules (recurrent_gemma
# ≤4.5x: `key_states`/`value_states` on the local attention, `conv1d_state` on the recurrent block,
# `recurrent_states` on the RG-LRU), found once per generation by `ModuleState.find`.
MODULE_STATE_ATTRS = ("key_states", "value_states", "conv1d_state", "conv_state", "recurrent_states",
                      "ssm_state", "ssm_states", "conv_states")
# Models known to keep state on modules even where a cache object is passed (their attention layers' KV
# may be in it, their recurrent layers' state is not): searched at the first step whatever it found.
MODULE_STATE_MODELS = frozenset({"recurrent_gemma"})
_MODULE_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


class ModuleState:
    """Where a model keeps per-layer state as attributes of its modules: (layer, module, attribute)."""

    def __init__(self, places: list[tuple[int, Any, str]]) -> None:
        self.places = places

    @classmethod
    def find(cls, model: torch.nn.Module) -> ModuleState | None:
        places = []
        for qualified, module in model.named_modules():
            attrs = vars(module)
            named = [a for a in MODULE_STATE_ATTRS if isinstance(attrs.get(a), torch.Tensor)]
            if not named:
                continue
            match = _MODULE_LAYER.search(f".{qualified}.")
            if match is None:
                continue
            places.extend((int(match.group(1)), module, a) for a in named)
        return cls(places) if places else None

    def read(self, inner: Any = None) -> ModuleStateCache:
        return ModuleStateCache(self, inner)


class ModuleStateCache:
    """One step's view of the model's module state (plus the cache object found, if any): the
    cache's layers first, then each layer found only on the modules."""

    def __init__(self, state: ModuleState, inner: Any) -> None:
        self.state = state
        self.inner = inner

    def entries(self) -> Iterator[LayerTensors]:
        seen: set[int] = set()
        if self.inner is not None:
            for entry in iter_layers(self.inner):
                seen.add(entry.layer)
                yield entry
        by_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for layer, module, attr in self.state.places:
            tensor = vars(module).get(attr)
            if isinstance(tensor, torch.Tensor) and tensor.numel() and layer not in seen:
                by_layer.setdefault(layer, []).append((attr, tensor))
        for layer in sorted(by_layer):
            named = dict(by_layer[layer])
            keys, values = named.pop("key_states", None), named.pop("value_states", None)
            if keys is not None:  # attention KV kept on the module (a preallocated window)
                yield LayerTensors(layer, "module", keys, values, extras=list(named.values()), preallocated=True)
            else:
                tensors = list(named.values()) + ([values] if values is not None else [])
                yield _state_entry(layer, "module", tensors, RECURRENT)


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
