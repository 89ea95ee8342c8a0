"""One generate() call's summary: its row in the `generations` table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvscope.recorder.step_hook import GenerationSteps

Reading = tuple[int | None, int | None, int | None]  # allocated, reserved, nvml_used
_NO_READING: Reading = (None, None, None)


@dataclass
class GenerationRecord:
    gen_id: int
    prompt_id: str
    prompt_text: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    eos_reached: bool = False
    cache_class: str = "none"
    batch_size: int = 1
    started_ns: int = 0
    ended_ns: int = 0
    steps: int = 0
    baseline: Reading = _NO_READING
    peak: Reading = _NO_READING
    post_return: Reading = _NO_READING
    post_release: Reading = _NO_READING
    post_empty_cache: Reading = _NO_READING
    extra: dict[str, Any] = field(default_factory=dict)

    def take_steps(self, gen: GenerationSteps) -> None:
        """What the hook recorded of this generation."""
        self.prompt_tokens = gen.prompt_tokens
        self.batch_size = gen.batch_size
        self.cache_class = gen.cache_class or "none"
        self.steps = gen.step

    def to_row(self, run_id: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "run_id": run_id, "gen_id": self.gen_id, "prompt_id": self.prompt_id,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "eos_reached": self.eos_reached, "cache_class": self.cache_class,
            "started_ns": self.started_ns, "ended_ns": self.ended_ns,
        }
        for point in ("baseline", "peak", "post_return", "post_release", "post_empty_cache"):
            allocated, reserved, nvml_used = getattr(self, point)
            row[f"{point}_allocated_bytes"] = allocated
            row[f"{point}_reserved_bytes"] = reserved
            row[f"{point}_nvml_used_bytes"] = nvml_used
        row["batch_size"] = self.batch_size
        row["prompt_text"] = self.prompt_text
        return row


def supports_disable_compile() -> bool:
    """Whether this transformers' GenerationConfig has `disable_compile` (4.50+)."""
    try:
        from transformers import GenerationConfig
    except ImportError:
        return False
    return hasattr(GenerationConfig(), "disable_compile")


def _eos_ids(model: Any, kwargs: dict[str, Any]) -> list[int]:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def generated_tokens(model: Any, output: Any, args: tuple, kwargs: dict[str, Any], steps: int,
                     decoder_prompt_tokens: int | None = None) -> tuple[int, bool]:
    """(new tokens per sequence, whether every sequence emitted EOS), read from generate's output.

    A decoder-only model's sequences start with the prompt (`input_ids`). An encoder-decoder's start
    with the decoder's prompt: the decoder start token (bart's equals its EOS), or the
    `decoder_input_ids` passed, or what generate put there itself (whisper's task tokens). None of
    it was generated: each recorded step generated one token, so the prompt is what comes before the
    last `steps` tokens; without steps, the `decoder_input_ids` or the tokens of the decoder's first
    forward pass (`decoder_prompt_tokens`).
    """
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        return steps, False
    if getattr(model.config, "is_encoder_decoder", False):
        # One decoder forward pass per generated token: what precedes the last `steps` tokens is the
        # decoder's prompt, whether generate returned it (bart, t5) or stripped it (whisper on 4.x).
        width = sequences.shape[-1]
        prompt_len = width - steps if 0 < steps <= width else _decoder_prompt_len(kwargs, decoder_prompt_tokens)
    else:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        prompt_len = ids.shape[-1] if isinstance(ids, torch.Tensor) else 0
    new = sequences[:, min(prompt_len, sequences.shape[-1]):]
    eos = _eos_ids(model, kwargs)
    if not eos or new.numel() == 0:
        return new.shape[-1], False
    hit = torch.isin(new, torch.tensor(eos, device=new.device)).any(dim=-1).all()
    return new.shape[-1], bool(hit)


def _decoder_prompt_len(kwargs: dict[str, Any], recorded: int | None) -> int:
    ids = kwargs.get("decoder_input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[-1]
    if recorded:  # tokens the decoder's first forward pass took (its prefill)
        return recorded
    return 1  # the decoder start token
