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

from kvscope.errors import UsageError
from kvscope.recorder.options import RecordOptions
from kvscope.recorder.prompt_set import Prompt, load_prompts
from kvscope.recorder.session import Recording
from kvscope.trace.reader import Trace, open_trace

ProgressHook = Callable[[str, int, int], None]  # (event, prompt index, value)


@dataclass
class RecordJob:
    output: Path
    model_dir: str | None = None
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


@dataclass
class RecordResult:
    trace: Path
    model_name: str
    num_layers: int
    device: str
    generations: list[dict[str, Any]]  # `generation_summaries`
    nvml_total: int | None


def read_summary(trace: Path, run_id: str) -> RecordResult:
    """What the CLI's summary table shows, read back from the written trace (not from the session):
    the run row's model, layers, device and NVML total, and each generation's row with its last
    step's kv_bytes and seq_len and the layers recorded at that step."""
    opened = open_trace(trace)
    (run,) = [r for r in opened.read("run", ["run_id", "model_name", "num_layers", "device", "nvml_total_bytes"])
              .to_pylist() if r["run_id"] == run_id]
    return RecordResult(trace, run["model_name"], run["num_layers"], run["device"],
                        generation_summaries(opened, run_id), run["nvml_total_bytes"])


def generation_summaries(opened: Trace, run_id: str) -> list[dict[str, Any]]:
    steps = [r for r in opened.read("steps", ["run_id", "gen_id", "step", "kv_bytes", "seq_len"]).to_pylist()
             if r["run_id"] == run_id]
    last = {}
    for row in sorted(steps, key=lambda r: (r["gen_id"], r["step"])):
        last[row["gen_id"]] = row
    layers: dict[tuple[int, int], int] = {}
    for row in opened.read("layers", ["run_id", "gen_id", "step"]).to_pylist():
        if row["run_id"] == run_id:
            layers[(row["gen_id"], row["step"])] = layers.get((row["gen_id"], row["step"]), 0) + 1
    summaries = []
    for row in sorted((r for r in opened.read("generations").to_pylist() if r["run_id"] == run_id),
                      key=lambda r: r["gen_id"]):
        step = last.get(row["gen_id"], {})
        summaries.append({**row, "last_kv_bytes": step.get("kv_bytes") or 0, "final_seq_len": step.get("seq_len") or 0,
                          "layers_recorded": layers.get((row["gen_id"], step.get("step")), 0)})
    return summaries


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def load_model(job: RecordJob, device: str) -> tuple[torch.nn.Module, Callable[[str], list[int]], str, str]:
    """(model, text → ids, model name, tokenizer description)."""
    if (job.model_dir is None) == (job.twin is None):
        raise UsageError("give either a local model directory or --twin NAME_OR_CONFIG_JSON (one of them).")
    if job.twin is not None:
        from kvscope.twins import load_twin, shrink_config
        from kvscope.twins.build import BYTE_TOKENIZER, build_twin, byte_token_ids

        spec = load_twin(job.twin)
        if job.shrink:
            spec = shrink_config(spec)
        model = build_twin(spec, dtype=job.dtype, device=device, attn_implementation=job.attn_implementation)
        vocab = int(model.config.get_text_config().vocab_size)
        return model, lambda text: byte_token_ids(text, vocab), str(model.config.name_or_path), BYTE_TOKENIZER
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvscope.twins.build import torch_dtype

    path = Path(job.model_dir)  # type: ignore[arg-type]
    if path.suffix == ".gguf" and path.is_file():
        # a GGUF file (llama.cpp's format): weights dequantized, tokenizer from the same file
        from kvscope.ppl.models import load_gguf

        model, tokenizer = load_gguf(path, torch_dtype(job.dtype) if job.dtype else None)
        if job.attn_implementation:
            model.set_attn_implementation(job.attn_implementation)
        model = model.to(device).eval()
        return (model, lambda text: tokenizer(text)["input_ids"], path.stem,
                f"{type(tokenizer).__name__} from {path.name}")
    if not path.is_dir():
        raise UsageError(f"{path} is not a local model directory (config.json, weights, tokenizer).")
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype(job.dtype)} if job.dtype else {"torch_dtype": "auto"}
    if job.attn_implementation:
        kwargs["attn_implementation"] = job.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, lambda text: tokenizer(text)["input_ids"], path.name, f"{type(tokenizer).__name__} from {path}"


def run_record(job: RecordJob, progress: ProgressHook | None = None) -> RecordResult:
    device = job.device or default_device()
    prompts: list[Prompt] = load_prompts(job.prompts_file, job.limit)
    model, encode, name, tokenizer = load_model(job, device)
    options = {"cli": True, "max_new_tokens": job.max_new_tokens, "min_new_tokens": job.min_new_tokens,
               "cache_implementation": job.cache_implementation, "twin": job.twin, "shrink": job.shrink,
               "prompts": job.prompts_file or "built-in"}
    hook = progress or (lambda event, index, value: None)
    hook("start", 0, len(prompts))
    record_options = replace(job.options, model_name=job.options.model_name or name,
                             tokenizer=job.options.tokenizer or tokenizer, extra={**job.options.extra, **options})
    with Recording(model, job.output, record_options) as rec:
        for index, prompt in enumerate(prompts):
            ids = torch.tensor([encode(prompt.text)], dtype=torch.long, device=device)
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
