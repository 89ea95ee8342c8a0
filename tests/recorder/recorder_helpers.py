"""Test helpers: tiny models per family and an independent count of a cache's unique bytes.

The independent count deliberately shares no code with the recorder: it enumerates the cache
object by the container layouts of the transformers versions under test, and counts bytes with a
per-storage bitmap (the recorder merges sorted intervals).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

TF_VERSION = Version(transformers.__version__)
PROMPT_TOKENS = 5
NEW_TOKENS = 20
WINDOW = 8

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
            moe_intermediate_size=32)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(_BASE, rotary_pct=0.25),
    "gemma2": dict(_BASE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
    "gemma3_text": dict(_BASE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=WINDOW, sliding_window_pattern=2),
    "gpt_oss": dict(_BASE, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, num_local_experts=4,
                    num_experts_per_tok=2),
    "glm4_moe": dict(_BASE, num_key_value_heads=2, head_dim=16, **_MOE),
    "deepseek_v3": dict(_BASE, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=8, **_MOE),
    "llama": dict(_BASE, num_key_value_heads=2),
    "mistral": dict(_BASE, num_key_value_heads=2, sliding_window=WINDOW),
}


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random-weight 2-layer model of this family, or skip when this transformers lacks it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    except (KeyError, ValueError) as exc:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} model ({type(exc).__name__})")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def prompt_ids(batch: int = 1, tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    return torch.arange(3, 3 + batch * tokens).reshape(batch, tokens) % 200 + 3


def _flatten(value: Any) -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            return [t for n in names for t in _flatten(getattr(value, n))]
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    return []


def cache_layer_tensors(cache: Any) -> list[list[torch.Tensor]]:
    """Each layer's tensors, by the container layouts of 4.46 / 4.57 / 5.x; an EncoderDecoderCache's
    self-attention layers, then its cross-attention layers (the recorder numbers them after)."""
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None:
        return _one_cache_layers(cache.self_attention_cache) + _one_cache_layers(cross)
    if isinstance(cache, (tuple, list)) and cache and all(isinstance(x, tuple) and len(x) == 4 for x in cache):
        return [list(layer[:2]) for layer in cache] + [list(layer[2:]) for layer in cache]  # legacy enc-dec tuples
    return _one_cache_layers(cache)


def _one_cache_layers(cache: Any) -> list[list[torch.Tensor]]:
    if isinstance(cache, (tuple, list)):
        return [list(layer[:2]) for layer in cache]
    if hasattr(cache, "layers"):
        return [_flatten(getattr(layer, "_quantized_keys", None)) + _flatten(getattr(layer, "_quantized_values", None))
                + _flatten(getattr(layer, "keys", None)) + _flatten(getattr(layer, "values", None))
                for layer in cache.layers]
    layers = []
    quantized_k = getattr(cache, "_quantized_key_cache", None) or []
    quantized_v = getattr(cache, "_quantized_value_cache", None) or []
    for i, keys in enumerate(cache.key_cache):
        found = _flatten(keys) + _flatten(cache.value_cache[i])
        if i < len(quantized_k):
            found += _flatten(quantized_k[i]) + _flatten(quantized_v[i])
        layers.append(found)
    return layers


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes covered by the tensors' storage extents, each byte once (a bitmap per storage)."""
    masks: dict[tuple[str, int], np.ndarray] = {}
    for t in tensors:
        storage = t.untyped_storage()
        mask = masks.setdefault((str(t.device), storage.data_ptr()), np.zeros(storage.nbytes(), dtype=bool))
        if t.numel() == 0:
            continue
        size = t.element_size()
        first = t.storage_offset()
        last = first + int(((torch.tensor(t.shape) - 1) * torch.tensor(t.stride())).sum())
        mask[first * size:(last + 1) * size] = True
    return int(sum(int(m.sum()) for m in masks.values()))


def output_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


class IndependentCounter:
    """A forward hook of the test's own: unique KV bytes after every forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.per_step: list[int] = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        layers = cache_layer_tensors(output_cache(output))
        self.per_step.append(unique_bytes([t for layer in layers for t in layer]))

    def remove(self) -> None:
        self.handle.remove()


# Columns that differ between two recordings of the same generations (clocks, ids).
TIMING_COLUMNS = {"t_ns", "recorder_ns", "started_ns", "ended_ns", "created_unix_s", "run_id"}


def trace_rows(path: Any, table: str, keys: list[str]) -> list[dict]:
    """A table's rows sorted by `keys`, without the columns that differ between recordings."""
    from kvscope.trace.reader import open_trace

    rows = open_trace(path).read(table).sort_by([(k, "ascending") for k in keys]).to_pylist()
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS and not k.startswith("created")}
            for row in rows]


def assert_same_recording(first: Any, second: Any) -> list[dict]:
    """Both traces are valid and have the same steps and layers rows; returns the layers rows."""
    from kvscope.trace.invariants import check_invariants
    from kvscope.trace.reader import open_trace

    for path in (first, second):
        assert check_invariants(open_trace(path)).ok
    assert trace_rows(first, "steps", ["gen_id", "step"]) == trace_rows(second, "steps", ["gen_id", "step"])
    layers = trace_rows(first, "layers", ["gen_id", "step", "layer"])
    assert layers == trace_rows(second, "layers", ["gen_id", "step", "layer"])
    return layers


class CacheOfLayers:
    """A cache container: only its `layers` list matters to the recorder's fast path."""

    def __init__(self, layers: list) -> None:
        self.layers = layers


def dynamic_layer(keys: torch.Tensor, values: torch.Tensor | None) -> object:
    """A transformers DynamicLayer holding these tensors (5.x layer classes only)."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer.__new__(DynamicLayer)
    layer.keys, layer.values = keys, values
    return layer


# -- an independent count for every architecture (KV, cross-attention KV, recurrent state) ----------
# Enumerates what each container of 4.57 / 5.x holds by its own reading of the transformers classes:
# no recorder code. Layer numbering follows the trace format: self-attention 0..n-1, then an
# encoder-decoder's cross-attention n..2n-1.
_STATE_NAMES = ("conv_states", "conv_cache", "ssm_states", "recurrent_states", "rnn_state")
_MODULE_STATE_NAMES = ("key_states", "value_states", "conv1d_state", "recurrent_states")


def _nonempty(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in tensors if t.numel()]


def _entry(states: Any, i: int) -> list[torch.Tensor]:
    if isinstance(states, dict):
        return _flatten(states.get(i))
    if isinstance(states, torch.Tensor):  # Mamba2Cache: [layers, ...]
        return [states[i]] if i < states.shape[0] else []
    return _flatten(states[i]) if i < len(states) else []


def held_by_layer(cache: Any, rwkv: bool = False) -> dict[int, list[torch.Tensor]]:
    """Per layer index, the non-empty tensors a returned cache object holds (`rwkv`: the `state` list
    of five [batch, hidden, layers] tensors)."""
    if cache is None:
        return {}
    if rwkv:
        return {i: [t[:, :, i] for t in cache] for i in range(cache[0].shape[-1])}
    cross = getattr(cache, "cross_attention_cache", None)
    if cross is not None:
        own = held_by_layer(cache.self_attention_cache)
        offset = len(getattr(cache.self_attention_cache, "layers", None) or
                     getattr(cache.self_attention_cache, "key_cache", None) or [])
        return {**own, **{offset + i: ts for i, ts in held_by_layer(cross).items()}}
    found: dict[int, list[torch.Tensor]] = {}
    if isinstance(cache, (tuple, list)):
        for i, layer in enumerate(cache):
            found[i] = _flatten(layer if isinstance(layer, torch.Tensor) else list(layer[:2]))
            if not isinstance(layer, torch.Tensor) and len(layer) == 4:  # (self K, self V, cross K, cross V)
                found[len(cache) + i] = _flatten(list(layer[2:]))
    elif hasattr(cache, "layers"):
        for i, layer in enumerate(cache.layers):
            found[i] = (_flatten(getattr(layer, "_quantized_keys", None))
                        + _flatten(getattr(layer, "_quantized_values", None)) + _flatten(getattr(layer, "keys", None))
                        + _flatten(getattr(layer, "values", None)) + _flatten(getattr(layer, "indexer_keys", None))
                        + _flatten(getattr(layer, "conv_states", None))
                        + _flatten(getattr(layer, "recurrent_states", None)))
    else:
        keys = getattr(cache, "key_cache", None) or []
        values = getattr(cache, "value_cache", None) or []
        states = [getattr(cache, n) for n in _STATE_NAMES if getattr(cache, n, None) is not None]
        count = max([len(keys)] + [len(s) if not isinstance(s, dict) else max(s, default=-1) + 1 for s in states])
        for i in range(count):
            found[i] = (_flatten(keys[i] if i < len(keys) else None) + _flatten(values[i] if i < len(values) else None)
                        + [t for s in states for t in _entry(s, i)])
    return {i: _nonempty(ts) for i, ts in found.items() if _nonempty(ts)}


def module_state_by_layer(model: torch.nn.Module) -> dict[int, list[torch.Tensor]]:
    """recurrent_gemma's state kept as plain tensor attributes of its layers' modules."""
    found: dict[int, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if "layers" not in parts or parts.index("layers") + 1 >= len(parts):
            continue
        index = int(parts[parts.index("layers") + 1])
        for attr in _MODULE_STATE_NAMES:
            value = module.__dict__.get(attr)
            if isinstance(value, torch.Tensor) and value.numel():
                found.setdefault(index, []).append(value)
    return found


class StateCounter:
    """Per forward pass: unique bytes per layer and in all, of the cache the model returned (or was
    called with), plus state on its modules for models that keep it there."""

    def __init__(self, model: torch.nn.Module, modules: bool = False) -> None:
        self.model = model
        self.modules = modules
        self.per_step: list[tuple[dict[int, int], int]] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        cache, found = None, None
        for name in ("cache", "past_key_values", "cache_params", "state"):
            value = getattr(output, name, None) if name in output else None
            if value is not None:
                cache, found = value, name
                break
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = held_by_layer(cache, rwkv=found == "state")
        if self.modules:
            for i, ts in module_state_by_layer(self.model).items():
                layers.setdefault(i, ts)
        per_layer = {i: unique_bytes(ts) for i, ts in layers.items()}
        self.per_step.append((per_layer, unique_bytes([t for ts in layers.values() for t in ts])))

    def remove(self) -> None:
        self.handle.remove()
