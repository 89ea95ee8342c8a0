"""Build a twin model (random weights) and map prompt text to ids without a tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from kvscope.errors import UsageError
from kvscope.twins.spec import TwinSpec

BYTE_OFFSET = 3  # keeps the commonest special ids (0-2) out of prompts
BYTE_TOKENIZER = f"byte-level: utf-8 byte + {BYTE_OFFSET}, modulo vocab_size (twin, no tokenizer)"


def transformers_at_least(major: int, minor: int) -> bool:
    """Whether the installed transformers is `major.minor` or later (keywords were renamed across releases)."""
    import transformers

    found = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return found >= (major, minor)


def torch_dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"unknown dtype {name!r}; use a torch dtype name such as bfloat16, float16, float32.")
    return value


def build_twin(spec: TwinSpec, *, dtype: str | None = None, device: str = "cpu",
               attn_implementation: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A random-weight model of the spec's architecture, in eval mode, on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(spec.config)
    model_type = values.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        values.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError) as exc:
        import transformers

        raise UsageError(f"transformers {transformers.__version__} cannot build model type {model_type!r} "
                         f"(twin {spec.name}): {exc}") from exc
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    target = torch_dtype(dtype or spec.dtype)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(target)  # initialise in the target dtype: no fp32 copy of a large model
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=target).eval()
    generation = model.generation_config
    if generation.pad_token_id is None:
        eos = generation.eos_token_id
        generation.pad_token_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    model.config.name_or_path = f"{spec.name} (twin{', shrunk' if spec.shrunk else ''})"
    return model


def byte_token_ids(text: str, vocab_size: int) -> list[int]:
    """Deterministic ids for a twin: each UTF-8 byte plus an offset, modulo the vocabulary."""
    return [(b + BYTE_OFFSET) % vocab_size for b in text.encode("utf-8")]
