"""KV geometry from a model's config: the bytes per token per layer a cache should hold.

Reads the Hugging Face key names of the common architectures: ``num_key_value_heads`` (absent in
gpt_neox and other multi-head models, where every attention head is a KV head),
``head_dim`` (else ``hidden_size / num_attention_heads``), the MLA latent ``kv_lora_rank`` and
``qk_rope_head_dim``, and the dtype as ``torch_dtype`` or ``dtype``. Multimodal configs keep the
decoder's keys under ``text_config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.untrusted import json_object

DTYPE_BYTES: dict[str, float] = {
    "float64": 8, "float32": 4, "float": 4, "tfloat32": 4, "bfloat16": 2, "float16": 2, "half": 2,
    "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1, "int4": 0.5, "uint4": 0.5, "int32": 4, "int64": 8, "int16": 2,
}


def dtype_bytes(name: object) -> float | None:
    """Bytes per element of a torch dtype name (with or without `torch.`); None when unknown."""
    if not isinstance(name, str):
        return None
    return DTYPE_BYTES.get(name.removeprefix("torch.").strip().lower())


def dtype_bytes_sql(column: str) -> str:
    """A SQL CASE giving the bytes per element of a dtype-name column (NULL when unknown)."""
    cases = " ".join(f"WHEN '{name}' THEN {size}" for name, size in DTYPE_BYTES.items())
    return f"(CASE lower(replace({column}, 'torch.', '')) {cases} ELSE NULL END)"


@dataclass(frozen=True)
class KVGeometry:
    """What one token costs in one layer: elements, and bytes when the dtype is known."""

    elements_per_token: int | None  # K + V elements (latent: c_kv + k_pe)
    dtype_bytes: float | None  # from the config; None when the config does not say
    latent: bool
    kv_heads: int | None
    head_dim: int | None
    source: str  # how it was derived, for the evidence
    # (layer, K + V elements) of the layers whose head size or kv heads differ from the model's
    # (Gemma 4's full layers: transformers' `per_layer_config`, or `global_head_dim` on the
    # full_attention layers); every other layer costs elements_per_token
    layer_elements: tuple[tuple[int, int], ...] = ()

    def elements_for(self, layer: int) -> int | None:
        for index, elements in self.layer_elements:
            if index == layer:
                return elements
        return self.elements_per_token

    @property
    def bytes_per_token(self) -> float | None:
        if self.elements_per_token is None or self.dtype_bytes is None:
            return None
        return self.elements_per_token * self.dtype_bytes


# Largest head count, head size or window a config may claim: larger values (a trace is untrusted
# input) are treated as absent, so products of them always fit an int64 column.
MAX_CONFIG_INT = 1 << 24


def config_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` holding a positive whole number up to MAX_CONFIG_INT, else None."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_CONFIG_INT:
            return int(value)
    return None


def parse_config(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    config = json_object(raw)
    text = config.get("text_config")
    if isinstance(text, dict) and "num_attention_heads" not in config and "kv_lora_rank" not in config:
        merged = dict(text)
        for key in ("torch_dtype", "dtype"):
            merged.setdefault(key, config.get(key))
        return merged
    return config


def geometry(raw_config: str | dict[str, Any] | None, model_type: str | None = None,
             layer_types: Sequence[str] | None = None) -> KVGeometry:
    """The expected KV geometry of a model from its config (JSON string or dict); `layer_types`
    (the run's, else the config's) says which layers a `global_head_dim` applies to."""
    config = parse_config(raw_config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    size = dtype_bytes(dtype)
    rank = config_int(config, "kv_lora_rank")
    rope = config_int(config, "qk_rope_head_dim")
    if rank is not None and rope is not None:
        return KVGeometry(rank + rope, size, True, 1, None, "(kv_lora_rank + qk_rope_head_dim)")
    heads = config_int(config, "num_attention_heads", "n_head", "num_heads")
    kv_heads = config_int(config, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if kv_heads is None:
        kv_heads = 1 if config.get("multi_query") is True else heads  # gpt_neox, gpt2, opt: MHA
    head_dim = config_int(config, "head_dim", "kv_channels")
    hidden = config_int(config, "hidden_size", "n_embd", "d_model")
    if head_dim is None and hidden is not None and heads:
        head_dim = hidden // heads
    if kv_heads is None or head_dim is None:
        return KVGeometry(None, size, False, kv_heads, head_dim, "config lacks head counts or head_dim")
    source = "2 x kv_heads x head_dim"
    layers: dict[int, int] = {}
    global_dim = config_int(config, "global_head_dim")
    types = layer_types if layer_types is not None else config.get("layer_types")
    if global_dim is not None and isinstance(types, (list, tuple)):
        # Gemma 4 as published: full layers have their own head size and kv heads
        full = 2 * (config_int(config, "num_global_key_value_heads") or kv_heads) * global_dim
        layers = {i: full for i, kind in enumerate(types) if kind == "full_attention"}
        source += "; full_attention layers 2 x num_global_key_value_heads x global_head_dim"
    overrides = _per_layer_elements(config.get("per_layer_config"), kv_heads, head_dim)
    if overrides:
        layers.update(overrides)  # the more specific: per layer
        source += f"; {len(overrides)} layers from per_layer_config"
    return KVGeometry(2 * kv_heads * head_dim, size, False, kv_heads, head_dim, source, tuple(sorted(layers.items())))


def _per_layer_elements(raw: Any, kv_heads: int, head_dim: int) -> dict[int, int]:
    """{layer: K + V elements} for the layers a `per_layer_config` {"05": {"head_dim": 512,
    "num_key_value_heads": 4}, ...} overrides; malformed entries are ignored (a trace is untrusted)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for key, override in list(raw.items())[:100_000]:
        try:
            layer = int(str(key))
        except ValueError:
            continue
        if layer < 0 or not isinstance(override, dict):
            continue
        dim = config_int(override, "head_dim") or head_dim
        heads = config_int(override, "num_key_value_heads") or kv_heads
        out[layer] = 2 * heads * dim
    return out
