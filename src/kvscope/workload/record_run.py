"""The `kvscope record` protocol: load a model or twin, generate over prompts, settle memory.

Per prompt: baseline reading and peak reset (in the session), generate, post-return reading,
outputs dropped, gc, post-release reading, `empty_cache()`, post-empty-cache reading (`settle`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kvscope.recorder.options import RecordOptions
from kvscope.recorder.session import Recording
from kvscope.trace.summary import RunSummary, read_summary
from kvscope.workload.prompt_set import load_prompts

ProgressHook = Callable[[str, int, int], None]  # (event, prompt index, value)


@dataclass
class RecordJob:
    output: Path
    model_dir: str | None = None  # a model directory, a .gguf file or builtin:smollm2
    twin: str | None = None
    shrink: bool = False
    prompts_file: str | None = None
    limit: int | None = None
    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    dtype: str | None = None
    device: str | None = None
    cache_implementation: str | None = None
    attn_implementation: str | None = None
    options: RecordOptions = field(default_factory=RecordOptions)  # the recorder's, as for kvscope.record


class _TokenCounter:
    """A generate() streamer that only counts tokens, for the progress bar."""

    def __init__(self, hook: ProgressHook, index: int) -> None:
        self.hook, self.index, self.first = hook, index, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt comes first
            self.first = False
            return
        self.hook("token", self.index, 1)

    def end(self) -> None:
        self.hook("done", self.index, 0)


def run_record(job: RecordJob, progress: ProgressHook | None = None) -> RunSummary:
    """Record `job`; the summary is read back from the written trace."""
    from kvscope.ppl.models import load_model

    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load_prompts(job.prompts_file, job.limit)
    loaded = load_model(job.model_dir, twin=job.twin, shrink=job.shrink, dtype=job.dtype, device=device,
                        attn_implementation=job.attn_implementation)
    model = loaded.model
    options = {"cli": True, "max_new_tokens": job.max_new_tokens, "min_new_tokens": job.min_new_tokens,
               "cache_implementation": job.cache_implementation, "twin": job.twin, "shrink": job.shrink,
               "prompts": job.prompts_file or "built-in"}
    hook = progress or (lambda event, index, value: None)
    hook("start", 0, len(prompts))
    name = loaded.name.removesuffix(".gguf")  # a trace names a GGUF model by its file's stem
    record_options = replace(job.options, model_name=job.options.model_name or name,
                             tokenizer=job.options.tokenizer or loaded.tokenizer,
                             extra={**job.options.extra, **options})
    with Recording(model, job.output, record_options) as rec:
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([loaded.encode(prompt.text)], dtype=torch.long, device=device)
            hook("prompt", index, ids.shape[-1])
            kwargs: dict[str, Any] = {"max_new_tokens": job.max_new_tokens, "do_sample": False,
                                      "attention_mask": torch.ones_like(ids), "streamer": _TokenCounter(hook, index)}
            if job.min_new_tokens is not None:
                kwargs["min_new_tokens"] = job.min_new_tokens
            if job.cache_implementation:
                kwargs["cache_implementation"] = job.cache_implementation
            rec.next_prompt(prompt.id, prompt.text)
            output = model.generate(ids, **kwargs)
            del output, ids  # the post-release reading needs the outputs gone
            rec.settle()
        run_id = rec.run_id
    return read_summary(job.output, run_id)
