"""Twin specifications: load a shipped or user config, shrink it, and state its KV geometry.

Pure dictionary work (no torch), so configs can be checked anywhere.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvscope.errors import UsageError

SHRUNK_VOCAB = 512
SHRUNK_INTERMEDIATE = 256
SHRUNK_MOE_INTERMEDIATE = 64
SHRUNK_HIDDEN = 512
SHRUNK_EXPERTS = 4
EXPERT_COUNT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "experts_per_token", "top_k_experts")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Everything the KV cache's size and layout depend on.
GEOMETRY_KEYS = ("num_hidden_layers", "num_key_value_heads", "head_dim", "layer_types", "sliding_window",
                 "sliding_window_pattern", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 # Gemma 4: full layers' own head_dim and kv heads, K = V on them, layers reusing another's KV
                 "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "num_kv_shared_layers")


@dataclass(frozen=True)
class TwinSpec:
    """A twin: its name, the repository its config comes from, its dtype and config values."""

    name: str
    source: str
    dtype: str
    config: dict[str, Any]
    notes: str = ""
    shrunk: bool = False

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])


def _configs_dir() -> Any:
    return resources.files("kvscope.twins") / "configs"


def list_twins() -> list[str]:
    """Names of the shipped twin configs."""
    return sorted(p.name.removesuffix(".json") for p in _configs_dir().iterdir() if p.name.endswith(".json"))


def load_twin(name_or_path: str) -> TwinSpec:
    """A shipped twin by name (`gpt-oss-20b`) or a JSON file: a twin spec or a bare HF config.json."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
        default_name = path.stem
    else:
        shipped = _configs_dir() / f"{name_or_path}.json"
        if not shipped.is_file():
            raise UsageError(f"unknown twin {name_or_path!r}: give a JSON config file or one of "
                             f"{', '.join(list_twins())}.")
        text = shipped.read_text()
        default_name = name_or_path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"twin config {name_or_path} is not valid JSON ({exc}).") from exc
    if "config" not in data:  # a bare config.json
        data = {"name": default_name, "source": str(name_or_path), "config": data,
                "dtype": data.get("torch_dtype") or data.get("dtype") or "float32"}
    config = data["config"]
    if "model_type" not in config:
        raise UsageError(f"twin config {name_or_path} has no model_type.")
    return TwinSpec(name=data.get("name", default_name), source=data.get("source", "unknown"),
                    dtype=str(data.get("dtype") or "float32"), config=config, notes=data.get("notes", ""))


def shrink_config(spec: TwinSpec) -> TwinSpec:
    """Shrink MLP, experts, vocabulary (and hidden size where head dims are explicit); keep KV geometry."""
    cfg = copy.deepcopy(spec.config)
    before = kv_geometry(cfg)
    # Where head_dim is implied by hidden_size / heads (GPT-NeoX), hidden_size is KV geometry: keep it.
    if ("head_dim" in cfg or "kv_lora_rank" in cfg) and cfg.get("hidden_size", 0) > SHRUNK_HIDDEN:
        cfg["hidden_size"] = SHRUNK_HIDDEN
    for key, size in (("intermediate_size", SHRUNK_INTERMEDIATE), ("moe_intermediate_size", SHRUNK_MOE_INTERMEDIATE),
                      ("vocab_size", SHRUNK_VOCAB), ("vocab_size_per_layer_input", SHRUNK_VOCAB)):
        if isinstance(cfg.get(key), int) and cfg[key] > size:
            cfg[key] = size
    for key in EXPERT_COUNT_KEYS:
        if isinstance(cfg.get(key), int) and cfg[key] > SHRUNK_EXPERTS:
            cfg[key] = SHRUNK_EXPERTS
    for key in EXPERTS_PER_TOKEN_KEYS:
        if isinstance(cfg.get(key), int):
            cfg[key] = min(cfg[key], 2)
    for key in ("n_group", "topk_group"):
        if key in cfg:
            cfg[key] = 1
    if isinstance(cfg.get("n_shared_experts"), int):
        cfg["n_shared_experts"] = min(cfg["n_shared_experts"], 1)
    vocab = cfg.get("vocab_size")
    if isinstance(vocab, int):
        for key in TOKEN_ID_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value >= vocab:
                cfg[key] = vocab - 1
            elif isinstance(value, list):
                cfg[key] = [v if v < vocab else vocab - 1 for v in value]
    after = kv_geometry(cfg)
    if after != before:  # a guard on this function itself: shrinking must never touch the cache
        raise AssertionError(f"shrinking changed the KV geometry: {before} -> {after}")
    return TwinSpec(spec.name, spec.source, spec.dtype, cfg, spec.notes, shrunk=True)


def kv_geometry(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config values the KV cache depends on (head_dim resolved where it is implied)."""
    geometry = {key: cfg.get(key) for key in GEOMETRY_KEYS}
    if geometry["num_key_value_heads"] is None:
        geometry["num_key_value_heads"] = cfg.get("num_attention_heads")
    if geometry["head_dim"] is None and "kv_lora_rank" not in cfg:
        heads = cfg.get("num_attention_heads")
        hidden = cfg.get("hidden_size")
        geometry["head_dim"] = hidden // heads if hidden and heads else None
    return geometry
