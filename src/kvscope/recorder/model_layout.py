"""What the model's config says about its KV cache, read once when recording starts.

Layer types come from ``config.layer_types`` where the installed transformers has it, else from
the older per-model flags (Gemma 2: even layers sliding; Gemma 3 ``sliding_window_pattern``;
Qwen2 ``use_sliding_window`` + ``max_window_layers``; a bare ``sliding_window`` makes every layer
sliding). MLA models are recognised by ``kv_lora_rank``; whether a layer holds the latent is
decided per step from the cached tensor's shape, because it depends on the transformers version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from kvscope.recorder.facts import LATENT
from kvscope.schema.layer_types import RECURRENT
from kvscope.schema.layer_types import SSM as SSM_TYPE

__all__ = ["FULL", "LATENT", "SLIDING", "ModelLayout", "model_layout"]

FULL = "full_attention"
SLIDING = "sliding_attention"

_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class ModelLayout:
    """KV-relevant facts of a model, computed once per recording."""

    model_type: str
    num_layers: int
    layer_types: tuple[str, ...]
    sliding_window: int | None
    kv_lora_rank: int | None
    attn_implementation: str
    dtype: str
    device: str
    cuda_devices: tuple[int, ...]
    # What a layer holding recurrent state alone is called: `ssm` in state-space models (mamba, mamba2,
    # jamba, bamba, zamba2, falcon_h1, ...), `recurrent` otherwise (rwkv, RG-LRU, gated delta net, xLSTM).
    state_type: str = RECURRENT

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if 0 <= layer < len(self.layer_types) else FULL


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return config


def num_hidden_layers(cfg: Any) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return 0


def declared_layer_types(cfg: Any) -> list[str]:
    """Each decoder layer's attention type, in Hugging Face's `layer_types` words."""
    n = num_hidden_layers(cfg)
    declared = getattr(cfg, "layer_types", None)
    if declared:
        return [str(t) for t in declared][:n] if len(declared) >= n else [str(t) for t in declared]
    model_type = getattr(cfg, "model_type", "")
    blocks = getattr(cfg, "block_types", None)  # recurrent_gemma: "recurrent" / "attention" (local), repeating
    if model_type == "recurrent_gemma" and isinstance(blocks, (list, tuple)) and blocks:
        return [SLIDING if blocks[i % len(blocks)] == "attention" else RECURRENT for i in range(n)]
    neo = getattr(cfg, "attention_layers", None)  # GPT-Neo: "global" / "local" (a window of `window_size`)
    if model_type == "gpt_neo" and isinstance(neo, (list, tuple)) and len(neo) >= n:
        return [SLIDING if t == "local" else FULL for t in neo[:n]]
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return [FULL] * n
    if model_type == "gemma2":
        return [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    pattern = getattr(cfg, "sliding_window_pattern", None) or getattr(cfg, "_sliding_window_pattern", None)
    if isinstance(pattern, int) and pattern > 1:
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if hasattr(cfg, "use_sliding_window"):
        if not cfg.use_sliding_window:
            return [FULL] * n
        first = getattr(cfg, "max_window_layers", 0) or 0
        return [SLIDING if i >= first else FULL for i in range(n)]
    return [SLIDING] * n


def model_layout(model: torch.nn.Module) -> ModelLayout:
    config = model.config
    cfg = text_config(config)
    first = next(model.parameters(), None)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    window = getattr(cfg, "sliding_window", None)
    if window is None and getattr(cfg, "model_type", "") == "gpt_neo":
        window = getattr(cfg, "window_size", None)
    rank = getattr(cfg, "kv_lora_rank", None)
    attn = getattr(config, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", None)
    return ModelLayout(
        model_type=str(getattr(cfg, "model_type", None) or getattr(config, "model_type", "unknown")),
        num_layers=num_hidden_layers(cfg),
        layer_types=tuple(declared_layer_types(cfg)),
        sliding_window=int(window) if isinstance(window, int) else None,
        kv_lora_rank=int(rank) if isinstance(rank, int) else None,
        attn_implementation=str(attn or "unknown"),
        dtype=str(first.dtype).removeprefix("torch.") if first is not None else "unknown",
        device=str(first.device) if first is not None else "cpu",
        cuda_devices=tuple(devices),
        state_type=state_layer_type(cfg),
    )


# Config attributes that only state-space (mamba-style) models have.
_SSM_ATTRS = ("ssm_state_size", "state_size", "mamba_d_state", "mamba_d_ssm", "ssm_cfg")


def state_layer_type(cfg: Any) -> str:
    return SSM_TYPE if any(isinstance(getattr(cfg, a, None), (int, dict)) for a in _SSM_ATTRS) else RECURRENT


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """Decoder attention modules with their layer index (``layer_idx`` or the qualified name).

    Vision-tower or cross-attention modules without a layer index in a decoder stack are left out.
    """
    found: list[tuple[int, torch.nn.Module]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith("Attention") and not cls.endswith("Attention2") and not name.endswith("attn"):
            continue
        if "vision" in name or "visual" in name or "encoder." in name:
            continue
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int):
            match = _LAYER_INDEX.search(f".{name}.")
            if match is None:
                continue
            index = int(match.group(1))
        found.append((index, module))
    return found


def attention_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """Per layer, how its attention scales and caps logits: {"scaling", "softcap", "sliding_window",
    "sinks"} as the modules hold them. Recorded in the run's options so offline statistics use the
    model's own scaling (Gemma 2's query_pre_attn_scalar, YaRN's mscale) instead of 1/sqrt(D)."""
    layers: dict[str, Any] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        scaling = getattr(module, "scaling", None)
        if not isinstance(layer, int) or not isinstance(scaling, (int, float)):
            continue
        softcap = getattr(module, "attn_logit_softcapping", None)
        window = getattr(module, "sliding_window", None)
        layers[str(layer)] = {
            "scaling": float(scaling),
            "softcap": float(softcap) if isinstance(softcap, (int, float)) and softcap else None,
            "sliding_window": int(window) if isinstance(window, int) and window > 0 else None,
            "sinks": isinstance(getattr(module, "sinks", None), torch.Tensor),
        }
    return layers
