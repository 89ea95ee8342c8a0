"""`kvscope.record(model, path)`: a context manager that records every `generate` call inside it.

Lifecycle of one generation (a `generate` call):
  baseline reading (allocator + NVML), peak counters reset → steps recorded by the forward hook
  → post-return reading as generate returns, rows handed to the writer (generate does not wait
  for the parts; settle() and the end of the block do) → post-release and post-empty-cache readings at `rec.settle()` (call it after dropping
  the outputs) or, if the user never settles, at the next `generate` (left null then) or at the
  `with` exit (taken there, with whatever the user still holds alive). The generation's row is
  written when it is settled.
An OOM inside generate writes an `oom` event with the allocator state and the last step's
readings, flushes, and re-raises the original exception unchanged.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import RecordingError, UsageError
from kvscope.recorder import native as native_fast_path
from kvscope.recorder.flusher import BackgroundWriter
from kvscope.recorder.generation import GenerationRecord, generated_tokens, supports_disable_compile
from kvscope.recorder.hooks import AttentionDiscovery
from kvscope.recorder.model_layout import attention_modules, attention_parameters, model_layout
from kvscope.recorder.nvml_poller import NvmlPoller
from kvscope.recorder.run_flags import merge_run_options
from kvscope.recorder.run_info import run_metadata
from kvscope.recorder.steps import SamplePolicy, StepRecorder
from kvscope.recorder.telemetry import AllocatorProbe, NvmlProbe, start_nvml_sampler
from kvscope.recorder.writer_process import WriterProcess
from kvscope.trace.writer import TraceWriter

# Where a finished recording says what it wrote and what to run next (INFO). Without any logging
# configured, kvscope prints it to stderr; logging.getLogger("kvscope").setLevel("WARNING") silences it.
log = logging.getLogger("kvscope.record")


def _announce(message: str) -> None:
    root = logging.getLogger("kvscope")
    if not root.handlers and not logging.getLogger().handlers and root.level == logging.NOTSET:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    log.info(message)

MAX_FLUSH_EVERY = 64
# "process": parts are encoded and written by a child process (no GIL shared with generate);
# "thread": by a thread of this process; "auto": the process, else the thread with a warning.
WRITER_MODES = ("auto", "process", "thread")
OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


class Recording:
    """A recording in progress; use it through `kvscope.record(...)` as a context manager."""

    def __init__(self, model: torch.nn.Module, path: str | Path, *, labels: dict[str, Any] | None = None,
                 sample_kv_every: int = 0, sample_layers: list[int] | None = None,
                 max_sample_bytes: int = 256 * 2**20, flush_every: int = MAX_FLUSH_EVERY,
                 nvml: str | bool = "auto", store_prompts: bool = False, model_name: str | None = None,
                 tokenizer: str | None = None, options: dict[str, Any] | None = None, head_stats_every: int = 0,
                 writer: str = "auto", native: str | bool = "auto", nvml_interval_ms: float = 1.0) -> None:
        if not 1 <= flush_every <= MAX_FLUSH_EVERY:
            raise UsageError(f"flush_every must be between 1 and {MAX_FLUSH_EVERY} steps, got {flush_every}.")
        if sample_kv_every < 0 or max_sample_bytes < 0 or head_stats_every < 0:
            raise UsageError("sample_kv_every, max_sample_bytes and head_stats_every must be >= 0.")
        if writer not in WRITER_MODES:
            raise UsageError(f"writer must be one of {', '.join(WRITER_MODES)}, got {writer!r}.")
        self.writer_mode = writer
        if not (native == "auto" or isinstance(native, bool)):
            raise UsageError(f"native must be 'auto', True or False, got {native!r}.")
        self.native_mode = native
        if not 0.1 <= nvml_interval_ms <= 1000:
            raise UsageError(f"nvml_interval_ms must be between 0.1 and 1000, got {nvml_interval_ms}.")
        self.nvml_interval_s = nvml_interval_ms / 1e3
        self.head_stats_every = head_stats_every
        if not hasattr(model, "generate"):
            raise UsageError(f"{type(model).__name__} has no generate(): pass the model you call generate on.")
        self.model = model
        self.path = Path(path)
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        self.store_prompts = store_prompts
        self.nvml_mode = nvml
        self.samples = SamplePolicy(sample_kv_every, frozenset(sample_layers) if sample_layers else None,
                                    max_sample_bytes)
        self.flush_every = flush_every
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.extra_options = dict(options or {})
        self.generations: list[GenerationRecord] = []
        self.no_cache_generations: list[int] = []  # generations in which no cache was seen (`_no_cache`)
        self._pending: GenerationRecord | None = None
        self._next_prompt: tuple[str | None, str | None] = (None, None)
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Recording:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop(settle=exc_type is None)

    def start(self) -> None:
        self.origin_ns = time.perf_counter_ns()
        self.layout = model_layout(self.model)
        self.native = native_fast_path.resolve(self.native_mode, on_cuda=bool(self.layout.cuda_devices))
        self.allocator = AllocatorProbe(self.layout.cuda_devices, self.native)
        self.nvml = NvmlProbe(self.layout.cuda_devices, self.nvml_mode)
        self.nvml_sampler = start_nvml_sampler(self.nvml, self.origin_ns, self.nvml_interval_s) \
            if self.nvml.enabled else None
        self.compile_disabled = supports_disable_compile()
        try:
            self.writer, writer_kind = self._start_writer()
            self._start_recording(writer_kind)
        except BaseException:
            self._release_helpers()  # no process or thread outlives a recording that failed to start
            raise

    def _start_recording(self, writer_kind: str) -> None:
        options = {
            "sample_kv_every": self.samples.every,
            "sample_layers": sorted(self.samples.layers) if self.samples.layers else "all",
            "max_sample_bytes": self.samples.max_bytes, "flush_every": self.flush_every,
            "nvml": self.nvml_mode, "nvml_available": self.nvml.enabled,
            "nvml_sampling": self.nvml_sampler.description if self.nvml_sampler is not None else None,
            "writer": writer_kind,
            # whether the per-step reads ran in the C++ fast path (True) or in Python (same rows)
            "native": self.native is not None,
            "store_prompts": self.store_prompts,
            "head_stats_every": self.head_stats_every,
            # per layer: the logit scaling, softcap, window and sinks the attention modules hold
            # (offline statistics use them instead of 1/sqrt(head_dim))
            "attention": attention_parameters(self.model),
            # generate's auto-compile would run the hooks inside a compiled graph: it is turned off.
            "compile": "disabled (generate(disable_compile=True))" if self.compile_disabled
            else "not auto-compiled by this transformers version",
            **self.extra_options,
        }
        self.metadata = run_metadata(self.model, self.layout, self.model_name, self.labels, self.tokenizer,
                                     options, self.nvml)
        self.run_id = self.metadata.run_id
        # Samples get their own thread, so a generate boundary never waits for their copies.
        self.sample_writer = BackgroundWriter(TraceWriter(self.path))
        self.writer.rows("run", list(self.metadata.to_row()), [tuple(self.metadata.to_row().values())])
        self.writer.flush(wait=True)  # a crash at any later instant leaves a trace with its run row
        self.samples.prepare(cuda=self.allocator.enabled)
        self.discovery = AttentionDiscovery(attention_modules(self.model))
        self.steps = StepRecorder(self.run_id, self.layout, self.allocator, self.nvml, self.writer,
                                  self.sample_writer, self.discovery, self.flush_every, self.samples, self.origin_ns,
                                  self.nvml_sampler, native=self.native)
        self._hook = self.model.register_forward_hook(self.steps.on_forward, with_kwargs=True)
        self.head_stats = None  # online per-head statistics (kvscope.kernels.online), every N steps
        if self.head_stats_every:
            from kvscope.kernels.online import HeadStatsCollector

            self.head_stats = HeadStatsCollector(self.head_stats_every, run_id=self.run_id).install(self.model)
        self._had_generate = "generate" in vars(self.model)
        self._original_generate = self.model.generate
        self.model.generate = self._generate  # type: ignore[method-assign]
        self._started = True

    def _release_helpers(self) -> None:
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
        for helper in (getattr(self, "sample_writer", None), getattr(self, "writer", None)):
            if helper is not None:
                try:
                    helper.close(compact=False)
                except Exception:  # noqa: BLE001 - the start failure is the error to report
                    pass
        if self.nvml_sampler is not None:
            self.nvml_sampler.close()

    def stop(self, *, settle: bool = True) -> None:
        if not self._started:
            return
        self._started = False
        self._hook.remove()
        self.discovery.remove()
        if self.head_stats is not None:
            self.head_stats.uninstall()
        if self._had_generate:
            self.model.generate = self._original_generate  # type: ignore[method-assign]
        else:
            del self.model.generate
        if self._pending is not None:
            if settle:
                self.settle()
            else:
                self._write_generation(self._pending)
        self.steps.close()
        self.sample_writer.close(compact=False)
        self.samples.staging = None  # give the pinned buffer back
        self.writer.close()
        if self.no_cache_generations:
            merge_run_options(self.path, self.run_id, {"cache_seen": False,
                                                       "cache_not_seen_generations": self.no_cache_generations})
        n = len(self.generations)
        _announce(f"kvscope: recorded {n} generation{'s' if n != 1 else ''} into {self.path}; next: "
                  f"kvscope analyze {self.path}  (or kvscope report {self.path} -o report.html)")

    def _start_writer(self) -> tuple[BackgroundWriter | WriterProcess, str]:
        """The writer process where NVML (if any) is polled into a shared ring; else a thread."""
        sampler = self.nvml_sampler
        process_possible = sampler is None or isinstance(sampler, NvmlPoller)
        if self.writer_mode != "thread" and process_possible:
            try:
                return WriterProcess(self.path, nvml=sampler, origin_ns=self.origin_ns), "process"
            except RecordingError as exc:
                if self.writer_mode == "process":
                    raise
                warnings.warn(f"kvscope: writing the trace from a thread instead of a process ({exc}); "
                              "decode steps after each flush may be slower.", RuntimeWarning, stacklevel=3)
        elif self.writer_mode == "process":
            raise RecordingError("writer='process' needs NVML polled by a process (or no NVML); "
                                 "the NVML thread fallback is in use.")
        return BackgroundWriter(TraceWriter(self.path), nvml=sampler), "thread"

    # -- user API --------------------------------------------------------------------------
    def next_prompt(self, prompt_id: str, text: str | None = None) -> None:
        """Name the next generate call's prompt (and its text, stored only with store_prompts)."""
        self._next_prompt = (prompt_id, text)

    def mark(self, name: str, **detail: Any) -> None:
        """Write a `marker` event (flushed with the next part)."""
        gen = self._pending.gen_id if self._pending else (self.generations[-1].gen_id if self.generations else None)
        self._event("marker", gen, None, {"name": name, **detail})
        self.writer.flush()

    def settle(self) -> GenerationRecord | None:
        """Take the post-release (after gc) and post-empty-cache readings of the last generation
        and write its row. Drop your references to generate's outputs before calling it."""
        record = self._pending
        if record is None:
            return None
        gc.collect()
        record.post_release = self._reading()
        self.allocator.empty_cache()
        record.post_empty_cache = self._reading()
        self._write_generation(record)
        self.writer.flush(wait=True)
        return record

    # -- generate wrapper ------------------------------------------------------------------
    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if self.compile_disabled and "disable_compile" not in kwargs:
            kwargs["disable_compile"] = True
        record = self._begin_generation()
        try:
            output = self._original_generate(*args, **kwargs)
        except BaseException as exc:
            self._abort_generation(record, exc)
            raise
        self._end_generation(record, output, args, kwargs)
        return output

    def _begin_generation(self) -> GenerationRecord:
        if self._pending is not None:  # never settled: its post-release readings stay null
            self._write_generation(self._pending)
        prompt_id, text = self._next_prompt
        self._next_prompt = (None, None)
        gen_id = len(self.generations)
        record = GenerationRecord(gen_id=gen_id, prompt_id=prompt_id or f"gen-{gen_id}",
                                  prompt_text=text if self.store_prompts else None)
        self.generations.append(record)
        record.baseline = self._reading()
        self.allocator.reset_peaks()
        record.started_ns = time.perf_counter_ns() - self.origin_ns
        self.steps.begin(gen_id)
        if self.head_stats is not None:
            self.head_stats.begin_generation(gen_id)
        return record

    def _end_generation(self, record: GenerationRecord, output: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        record.ended_ns = time.perf_counter_ns() - self.origin_ns
        steps = self.steps
        reading = self.allocator.read()
        record.post_return = (reading.allocated if reading else None, reading.reserved if reading else None,
                              self.nvml.used())
        record.peak = (reading.peak_allocated if reading else None, reading.peak_reserved if reading else None,
                       _max_or_none(steps.nvml_peak, record.baseline[2], record.post_return[2]))
        record.prompt_tokens = steps.prompt_tokens
        record.batch_size = steps.batch_size
        record.cache_class = steps.cache_class or "none"
        record.steps = steps.step
        record.last_kv_bytes = steps.last_kv_bytes()
        record.final_seq_len = steps.seq_len
        record.layers_recorded = steps.last.get("layers", 0)
        if steps.step and not steps.cache_seen and not steps.failed_steps:
            self._no_cache(record, steps)
        record.new_tokens, record.eos_reached = generated_tokens(self.model, output, args, kwargs, steps.step,
                                                                 steps.prompt_tokens)
        if self.store_prompts and record.prompt_text is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                record.prompt_text = json.dumps(ids[0].tolist())
        self._write_events(steps.events, record.gen_id)
        self._write_head_stats()
        # No wait: generate returns while the writer thread writes the last parts (settle() and the
        # end of the `with` block wait for them, and report any write error).
        steps.end(wait=False)
        self._pending = record

    def _no_cache(self, record: GenerationRecord, steps: StepRecorder) -> None:
        """No cache object or recurrent state found at any step: the trace would show 0 bytes and no
        layers as if the model held nothing. Say so: a warning, a `no_cache` event, and at the end of
        the block `cache_seen: false` in the run's options."""
        self.no_cache_generations.append(record.gen_id)
        message = (f"kvscope: no cache seen in generation {record.gen_id} ({self.layout.model_type}, "
                   f"{steps.step} steps): neither the model's outputs, its forward keywords nor its modules "
                   "held a cache or recurrent state the recorder can read, so the trace has no layer rows and "
                   "0 KV bytes for it (generate(use_cache=False), or a container kvscope does not know).")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        steps.events.append({"kind": "no_cache", "step": None, "detail": {
            "source": "cache_walk", "model_type": self.layout.model_type, "steps": steps.step,
            "cache_class": steps.cache_class, "message": message}})

    def _abort_generation(self, record: GenerationRecord, exc: BaseException) -> None:
        steps = self.steps
        last = steps.last
        reading = last.pop("allocator", None)
        last["allocator"] = reading._asdict() if reading is not None else None
        detail: dict[str, Any] = {"exception": type(exc).__name__, "message": str(exc)[:4000], "last_step": last}
        is_oom = isinstance(exc, OOM_ERRORS)
        if is_oom:
            detail["allocator_now"] = self.allocator.snapshot() if self.allocator.enabled else None
            detail["nvml_used_bytes"] = self.nvml.used()
        self._write_events(steps.events, record.gen_id)
        self._event("oom" if is_oom else "error", record.gen_id, steps.step, detail)
        self._write_head_stats()
        steps.end(wait=True)

    # -- rows ------------------------------------------------------------------------------
    def _reading(self) -> tuple[int | None, int | None, int | None]:
        reading = self.allocator.read()
        if reading is None:
            return (None, None, self.nvml.used())
        return (reading.allocated, reading.reserved, self.nvml.used())

    def _write_generation(self, record: GenerationRecord) -> None:
        self._pending = None if self._pending is record else self._pending
        row = record.to_row(self.run_id)
        self.writer.rows("generations", list(row), [tuple(row.values())])

    def _write_head_stats(self) -> None:
        if self.head_stats is not None:
            columns = self.head_stats.drain()
            self.writer.rows("head_stats", list(columns), list(zip(*columns.values(), strict=True)))
            for error in self.head_stats.drain_errors():  # statistics skipped, generation unchanged
                self._event("error", error.get("gen_id"), error.get("step"), error)

    def _write_events(self, events: list[dict[str, Any]], gen_id: int) -> None:
        for event in events:
            self._event(event["kind"], gen_id, event.get("step"), event["detail"])
        events.clear()

    def _event(self, kind: str, gen_id: int | None, step: int | None, detail: dict[str, Any]) -> None:
        row = (self.run_id, gen_id, step, time.perf_counter_ns() - self.origin_ns, kind,
               json.dumps(detail, default=str))
        self.writer.rows("events", ("run_id", "gen_id", "step", "t_ns", "kind", "detail"), [row])


def _max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def record(model: torch.nn.Module, path: str | Path, **options: Any) -> Recording:
    """Record the KV cache of every `model.generate(...)` call made inside the `with` block.

    Options: labels, sample_kv_every (0 = off), sample_layers, max_sample_bytes, flush_every
    (≤ 64), nvml ("auto", True, False), store_prompts, model_name, tokenizer, head_stats_every (0 = off:
    per-head statistics every N steps into head_stats, see docs/kernels.md), writer ("auto", "process",
    "thread"), native ("auto", True, False: the C++ fast path of the per-step reads), nvml_interval_ms (how
    often the polling process reads NVML, default 1). See docs/recorder.md.
    """
    return Recording(model, path, **options)
