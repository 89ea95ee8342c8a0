"""Strided sliding-window perplexity of a model and its weight variants, each run recorded.

The method (the one in the Hugging Face perplexity guide): the chunk is tokenized once; windows of
`window` tokens start every `stride` tokens; in each window only the tokens not scored by an earlier
window are targets, the rest are context whose labels are -100. Every token but the first is scored
exactly once, each with at least `window - stride` tokens of context (except in the first window).
PPL = exp(sum of the targets' negative log-likelihoods / number of targets): each token's NLL in
float32 (log-softmax of the logits), the sum in float64.

lm-eval's `wikitext` task scores disjoint windows instead (each token of a window is a target, so
the first tokens of every window have little or no context) and reports word- and byte-normalised
perplexities; the numbers are therefore not comparable with it (they are lower here for the same
model, more so for smaller windows).

Each window is one `generate(max_new_tokens=1)` call inside `kvscope.record`, so the recorder sees a
prefill of the window (its KV cache, allocator and NVML readings) as one generation of the variant's
run; the logits of all window positions are taken from that forward pass (`logits_to_keep=0`).
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import RecordingError, UsageError
from kvscope.ppl.models import LoadedModel
from kvscope.ppl.quantize import Variant, weight_bytes
from kvscope.ppl.text import TextChunk

# (event, variant name, index, total): "variant" (index of the variant, of total), "window"
# (window index done, of total windows), "done" (the variant finished).
PplProgress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the window in the chunk
    end: int  # one past its last token
    targets: int  # tokens scored in this window (the last `targets` positions; the first token never)

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The strided windows over `n_tokens` tokens; their targets sum to n_tokens - 1."""
    if window < 2:
        raise UsageError(f"--window {window}: a window needs at least 2 tokens.")
    if stride < 1 or window <= stride:
        raise UsageError(f"--window {window} --stride {stride}: the stride must be at least 1 and below the window "
                         "(window - stride tokens are the context of each window).")
    if n_tokens < 2:
        raise UsageError(f"the text is {n_tokens} token(s) long: perplexity needs at least 2.")
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        new = end - previous_end
        windows.append(Window(begin, end, new - 1 if begin == 0 else new))
        previous_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class VariantResult:
    name: str
    description: str
    ppl: float
    nll_sum: float
    scored_tokens: int
    seconds: float  # the forward passes and losses (generate + cross-entropy), the recorder's settle excluded
    tokens_per_s: float
    weight_bytes: int
    peak_bytes: int | None
    peak_kind: str  # "cuda peak allocated" or "weights + CPU resident growth"
    kv_bytes_per_token_layer: float | None  # from the recorder: last step's KV bytes / tokens / layers
    trace: str | None
    delta_pct: float | None = None  # PPL vs the native variant, in %


@dataclass
class PplResult:
    model: str
    tokenizer: str
    is_twin: bool
    text_source: str
    text_chars: int
    text_sha256: str
    tokens: int
    window: int
    stride: int
    windows: int
    scored_tokens: int
    device: str
    dtype: str
    variants: list[VariantResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits_kwarg(model: torch.nn.Module) -> dict[str, int]:
    """Ask for the logits of every position (generate keeps only the last by default)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 0}
    return {}


def _pad_token(model: torch.nn.Module) -> int:
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "pad_token_id", None), getattr(generation, "eos_token_id", None)):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class _ResidentPeak:
    """CPU: the peak growth of the process's resident memory (VmHWM, reset through
    /proc/self/clear_refs) over its resident size when started; None where Linux does not allow it."""

    def __init__(self) -> None:
        self.start = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_kib("VmRSS")
        except OSError:
            self.start = None

    def growth(self) -> int | None:
        peak = _status_kib("VmHWM")
        if self.start is None or peak is None:
            return None
        return max(0, peak - self.start) * 1024


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def evaluate_variant(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], device: str,
                     recording: Any, progress: Callable[[int], None] | None = None) -> tuple[float, int, float]:
    """(sum of the targets' NLL, number of targets, seconds) of `model` over the windows, each window a
    generate(max_new_tokens=1) call inside `recording` (a kvscope Recording).

    On CUDA each window is settled (gc, then the post-release and post-empty-cache readings); on the
    CPU there is no allocator to read, so the next window writes the previous one's row (post-release
    readings null, as they would be anyway) and the gc pass per window (about 0.1-1 s) is saved."""
    import torch.nn.functional as F

    captured: list[torch.Tensor] = []

    def keep_logits(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output:
            logits = output[0]
        if not captured and isinstance(logits, torch.Tensor):
            captured.append(logits)

    extra = _logits_kwarg(model)
    pad = _pad_token(model)
    settle = torch.device(device).type == "cuda"
    handle = model.register_forward_hook(keep_logits, with_kwargs=True)
    nll_sum, scored, seconds = 0.0, 0, 0.0
    try:
        for index, window in enumerate(windows):
            x = ids[window.begin:window.end].unsqueeze(0).to(device)
            recording.next_prompt(f"window-{index}")
            captured.clear()
            start = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                                        pad_token_id=pad, **extra)
                if not captured or captured[0].shape[-2] != window.length:
                    got = tuple(captured[0].shape) if captured else None
                    raise RecordingError(f"{type(model).__name__} returned logits of shape {got} for a window of "
                                         f"{window.length} tokens: it cannot return the logits of every position "
                                         "from generate (logits_to_keep).")
                logits = captured.pop()
                first = window.length - window.targets  # first target position in the window (>= 1)
                nll = F.cross_entropy(logits[0, first - 1:window.length - 1].float(), x[0, first:window.length],
                                      reduction="none").double().sum()  # float32 per token, summed in float64
                nll_sum += float(nll)
            seconds += time.perf_counter() - start
            scored += window.targets
            del output, logits, nll, x
            if settle:
                recording.settle()
            if progress is not None:
                progress(index + 1)
    finally:
        handle.remove()
    return nll_sum, scored, seconds


def _kv_bytes_per_token_layer(trace: Path, run_id: str) -> float | None:
    """The first generation's last step, as written: its KV bytes per token of context per layer."""
    from kvscope.trace.reader import open_trace
    from kvscope.trace.summary import generation_summaries  # like Recording: imported when evaluating

    first = next(iter(generation_summaries(open_trace(trace), run_id)), None)
    if first is None or not first["final_seq_len"] or not first["layers_recorded"]:
        return None
    return first["last_kv_bytes"] / first["final_seq_len"] / first["layers_recorded"]


def run_ppl(loaded: LoadedModel, chunk: TextChunk, variants: list[Variant], *, window: int, stride: int,
            device: str = "cpu", output: Path | None = None, labels: dict[str, str] | None = None,
            progress: PplProgress | None = None, record_options: dict[str, Any] | None = None) -> PplResult:
    """Perplexity of each variant over the chunk, each variant's windows recorded into its own trace
    (`output/<variant>`; a temporary folder, deleted at the end, without `output`). `record_options`
    go to `kvscope.record` (e.g. writer="thread")."""
    from kvscope.recorder.session import Recording

    ids_list = loaded.encode(chunk.text)
    ids = torch.tensor(ids_list, dtype=torch.long)
    wins = sliding_windows(len(ids_list), window, stride)
    base = loaded.model
    result = PplResult(loaded.name, loaded.tokenizer, loaded.is_twin, chunk.source, chunk.chars, chunk.sha256,
                       len(ids_list), window, stride, len(wins), sum(w.targets for w in wins), device,
                       str(next(base.parameters()).dtype).removeprefix("torch."))
    hook = progress or (lambda event, name, index, total: None)
    scratch = tempfile.TemporaryDirectory(prefix="kvscope-ppl-") if output is None else None
    root = output if output is not None else Path(scratch.name)  # type: ignore[union-attr]
    cuda = torch.device(device).type == "cuda"
    try:
        for index, variant in enumerate(variants):
            hook("variant", variant.name, index, len(variants))
            reuse = (variant.name == "none" and not cuda) or index == len(variants) - 1
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model = variant.apply(base if reuse else copy.deepcopy(base), device).eval()
            weights = weight_bytes(model)
            # A short warm-up pass: one-time costs (kernel selection, the first touch of memory-mapped
            # weights) stay out of tokens/s and out of the CPU resident growth.
            with torch.inference_mode():
                model(ids[:min(16, len(ids_list))].unsqueeze(0).to(device))
            resident = None if cuda else _ResidentPeak()
            trace = root / variant.name
            run_labels = {"eval": "ppl", "variant": variant.name, "window": str(window), "stride": str(stride),
                          "text_sha256": chunk.sha256, **(labels or {})}
            options = {"ppl": {"variant": variant.name, "description": variant.description, "window": window,
                               "stride": stride, "text": chunk.source, "text_chars": chunk.chars,
                               "text_sha256": chunk.sha256, "tokens": len(ids_list), "windows": len(wins)}}
            with Recording(model, trace, labels=run_labels, model_name=f"{loaded.name} [{variant.name}]",
                           tokenizer=loaded.tokenizer, options=options, **(record_options or {})) as rec:
                nll_sum, scored, seconds = evaluate_variant(
                    model, ids, wins, device, rec, lambda done, name=variant.name: hook("window", name, done, len(wins)))
                ppl = math.exp(nll_sum / scored)
                rec.mark("ppl", variant=variant.name, ppl=ppl, nll_sum=nll_sum, scored_tokens=scored,
                         seconds=seconds)
                run_id = rec.run_id
            if cuda:
                peak: int | None = torch.cuda.max_memory_allocated(device)
                kind = "cuda peak allocated"
            else:
                growth = resident.growth() if resident is not None else None
                peak = weights + growth if growth is not None else None
                kind = "weights + CPU resident growth"
            kv = _kv_bytes_per_token_layer(trace, run_id)
            result.variants.append(VariantResult(
                variant.name, variant.description, ppl, nll_sum, scored, seconds,
                scored / seconds if seconds > 0 else float("inf"), weights, peak, kind, kv,
                str(trace) if output is not None else None))
            if not reuse:
                del model
                gc.collect()
            hook("done", variant.name, index, len(variants))
    finally:
        if scratch is not None:
            scratch.cleanup()
    native = result.variants[0].ppl if result.variants else None
    for item in result.variants:
        item.delta_pct = (item.ppl / native - 1) * 100 if native else None
    return result
