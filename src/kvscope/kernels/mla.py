"""MLA (multi-head latent attention) arithmetic that needs neither torch nor a GPU.

The analyser imports this module, so it must stay free of torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MLA_KEYS = ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")


def is_mla_config(config: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face config dict describes MLA (DeepSeek-V2/V3 style latents)."""
    return all(config.get(key) for key in MLA_KEYS)


def mla_compression_ratio(config: Mapping[str, Any]) -> float:
    """Per-head cache width over latent cache width, per token and layer.

    (H·(qk_nope + qk_rope) + H·v_head_dim) / (kv_lora_rank + qk_rope): how many times more
    elements a decompressed per-head K/V cache would hold than the cached latent and RoPE key.
    Nested ``text_config`` dicts (multimodal configs) are looked into.
    """
    if not is_mla_config(config) and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]
    missing = [key for key in MLA_KEYS if not config.get(key)]
    if missing:
        raise ValueError(f"not an MLA config: missing or zero {', '.join(missing)}")
    heads = int(config["num_attention_heads"])
    nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    per_head = heads * (nope + rope) + heads * int(config["v_head_dim"])
    return per_head / (int(config["kv_lora_rank"]) + rope)


def erank_from_eigenvalues(eigenvalues: Sequence[float]) -> float:
    """Roy–Vetterli effective rank from the eigenvalues σ² of a Gram matrix XᵀX.

    σ_i = sqrt(max(λ_i, 0)), p_i = σ_i / Σσ, erank = exp(−Σ p_i log p_i); 0 when every σ is 0.
    """
    sigma = [math.sqrt(max(float(v), 0.0)) for v in eigenvalues]
    total = sum(sigma)
    if total <= 0.0 or not math.isfinite(total):
        return 0.0
    entropy = -sum((s / total) * math.log(s / total) for s in sigma if s > 0.0)
    return math.exp(entropy)
