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
from kvscope.recorder.allocator import AllocatorProbe
from kvscope.recorder.batch_writer import GenerationWindow, NvmlConfig, Rows, max_or_none
from kvscope.recorder.columns import EVENT_COLUMNS
from kvscope.recorder.devices import (
    BASELINE_STEP,
    DEVICE_STEP_COLUMNS,
    RELEASED_STEP,
    CudaDevices,
    DeviceProbe,
    DeviceRows,
    layer_devices,
)
from kvscope.recorder.generation import GenerationRecord, generated_tokens, supports_disable_compile
from kvscope.recorder.hooks import AttentionDiscovery
from kvscope.recorder.model_layout import attention_modules, attention_parameters, model_layout
from kvscope.recorder.nvml import NvmlProbe
from kvscope.recorder.options import RecordOptions
from kvscope.recorder.run_flags import merge_run_options
from kvscope.recorder.run_info import run_metadata
from kvscope.recorder.step_hook import GenerationSteps, SamplePolicy, StepRecorder
from kvscope.recorder.writer_process import WriterProcess
from kvscope.recorder.writer_thread import BackgroundWriter
from kvscope.trace.writer import TraceWriter

# Where a finished recording says what it wrote and what to run next (INFO). Without any logging
# configured, kvscope prints it to stderr; logging.getLogger("kvscope").setLevel("WARNING") silences it.
log = logging.getLogger("kvscope.record")


def _announce(message: str, logger: logging.Logger = log) -> None:
    root = logging.getLogger("kvscope")
    if not root.handlers and not logging.getLogger().handlers and root.level == logging.NOTSET:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    logger.info(message)


_native_hint_given = False


def _hint_native_build() -> None:
    """Once per process: on CUDA without a cached build the per-step reads run in Python, which
    costs more than the 1% the recorder is built for (benchmarks.md, H200)."""
    global _native_hint_given
    if not _native_hint_given:
        _native_hint_given = True
        # its own logger: `kvscope record` quiets kvscope.record's end-of-block line, not this one
        _announce("kvscope: measuring each decode step in Python (about 1.2% of a step on an H200); "
                  "`python -m kvscope.recorder.native` builds the C++ fast path once (about 0.4%).",
                  logging.getLogger("kvscope.native"))


OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
Writer = WriterProcess | BackgroundWriter


class Recording:
    """A recording in progress; use it through `kvscope.record(...)` as a context manager."""

    def __init__(self, model: torch.nn.Module, path: str | Path, options: RecordOptions | dict[str, Any] | None = None,
                 **keywords: Any) -> None:
        """`options`: a `RecordOptions`, or (as before) a dict stored in the run's options; `keywords`:
        the fields of `RecordOptions`."""
        # a test double for per-device readings (recorder/devices.py); CUDA devices are read otherwise
        self._device_probe: DeviceProbe | None = keywords.pop("device_probe", None)
        self.options = RecordOptions.from_keywords(options, **keywords)
        if not hasattr(model, "generate"):
            raise UsageError(f"{type(model).__name__} has no generate(): pass the model you call generate on.")
        self.model = model
        self.path = Path(path)
        o = self.options
        self.samples = SamplePolicy(o.sample_kv_every, frozenset(o.sample_layers) if o.sample_layers else None,
                                    o.max_sample_bytes)
        self.generations: list[GenerationRecord] = []
        self.no_cache_generations: list[int] = []  # generations in which no cache was seen (`_no_cache`)
        self._pending: GenerationRecord | None = None
        self._next_prompt: tuple[str | None, str | None] = (None, None)
        self._started = False
        self._generating = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Recording:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop(settle=exc_type is None)

    def start(self) -> None:
        """Open the block: nothing here waits for a helper process (what is sent waits in its pipe)."""
        self.origin_ns = time.perf_counter_ns()
        self.layout = model_layout(self.model)
        self.native, native_build = native_fast_path.resolve(self.options.native, on_cuda=bool(self.layout.cuda_devices))
        if native_build == native_fast_path.NO_CACHED_BUILD:
            _hint_native_build()
        self.allocator = AllocatorProbe(self.layout.cuda_devices, self.native)
        self.nvml = NvmlProbe(self.layout.cuda_devices, self.options.nvml)
        self.compile_disabled = supports_disable_compile()
        try:
            self.writer = self._start_writer()
            self._start_recording(native_build)
        except BaseException:
            self._release_helpers()  # no process or thread outlives a recording that failed to start
            raise

    def _start_recording(self, native_build: str) -> None:
        o = self.options
        interval = f"{o.nvml_interval_ms:g} ms"
        options = {
            **o.to_run_options(),
            "nvml_available": self.nvml.enabled,
            "nvml_sampling": f"{self.writer.kind}, polled every {interval}" if self.nvml.enabled else None,
            "writer": self.writer.kind,
            # whether the per-step reads ran in the C++ fast path (True) or in Python (same rows), and why
            "native": self.native is not None, "native_build": native_build,
            # per layer: the logit scaling, softcap, window and sinks the attention modules hold
            # (offline statistics use them instead of 1/sqrt(head_dim))
            "attention": attention_parameters(self.model),
            # generate's auto-compile would run the hooks inside a compiled graph: it is turned off.
            "compile": "disabled (generate(disable_compile=True))" if self.compile_disabled
            else "not auto-compiled by this transformers version",
        }
        self.metadata = run_metadata(self.model, self.layout, o.model_name, dict(o.labels), o.tokenizer, options,
                                     self.nvml)
        self.run_id = self.metadata.run_id
        # Samples get their own thread, so a generate boundary never waits for their copies.
        self.sample_writer = BackgroundWriter(TraceWriter(self.path))
        row = self.metadata.to_row()
        self.writer.send(Rows("run", tuple(row), [tuple(row.values())]))
        # A crash at any later instant leaves a trace with its run row: the writer process reads its
        # pipe to the end even after this process died; a writer thread is waited for (milliseconds).
        self.writer.flush(wait=self.writer.kind == "thread")
        if self.nvml.enabled:
            self.writer.send(NvmlConfig(self.run_id, tuple(self.nvml.device_ids()), self.origin_ns,
                                        o.nvml_interval_ms / 1e3))
        self.samples.prepare(cuda=self.allocator.enabled)
        self.discovery = AttentionDiscovery(attention_modules(self.model))
        self.devices = self._device_split()
        self.steps = StepRecorder(self.run_id, self.layout, self.allocator, self.nvml.total, self.writer,
                                  self.sample_writer, self.discovery, o.flush_every, self.samples, self.origin_ns, native=self.native)
        self.steps.device_rows = self.devices
        self._hook = self.model.register_forward_hook(self.steps.on_forward, with_kwargs=True)
        self.head_stats = None  # online per-head statistics (kvscope.kernels.online), every N steps
        if o.head_stats_every:
            from kvscope.kernels.online import HeadStatsCollector

            self.head_stats = HeadStatsCollector(o.head_stats_every, run_id=self.run_id).install(self.model)
        self._had_generate = "generate" in vars(self.model)
        self._original_generate = self.model.generate
        self.model.generate = self._generate  # type: ignore[method-assign]
        self._started = True

    def _device_split(self) -> DeviceRows | None:
        """Per-device rows when the model's layers span two or more devices (device_map)."""
        devices = layer_devices(self.model, self.metadata.num_layers)
        if devices is None:
            return None
        probe = self._device_probe or CudaDevices(tuple(sorted(set(devices))), self.allocator, self.nvml)
        return DeviceRows(self.run_id, devices, probe)

    def _write_devices(self, gen_id: int, *, layers: bool) -> None:
        if self.devices is None:
            return
        if layers:
            self.writer.send(Rows("layer_devices", ("run_id", "gen_id", "layer", "device"),
                                  self.devices.layer_rows(gen_id)))
        rows = self.devices.drain()
        if rows:
            self.writer.send(Rows("device_steps", DEVICE_STEP_COLUMNS, rows))

    def _release_helpers(self) -> None:
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
        for helper in (getattr(self, "sample_writer", None), getattr(self, "writer", None)):
            if helper is not None:
                helper.discard()

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
        self.sample_writer.close(compact=False)
        self.samples.staging = None  # give the pinned buffer back
        self.writer.close()
        if self.no_cache_generations:
            merge_run_options(self.path, self.run_id, {"cache_seen": False,
                                                       "cache_not_seen_generations": self.no_cache_generations})
        n = len(self.generations)
        _announce(f"kvscope: recorded {n} generation{'s' if n != 1 else ''} into {self.path}; next: "
                  f"kvscope analyze {self.path}  (or kvscope report {self.path} -o report.html)")

    def _start_writer(self) -> Writer:
        """The writer process; with writer="auto", a thread (and a warning) where it cannot start."""
        if self.options.writer != "thread":
            try:
                return WriterProcess(self.path)
            except RecordingError as exc:
                if self.options.writer == "process":
                    raise
                warnings.warn(f"kvscope: writing the trace from a thread instead of a process ({exc}); "
                              "decode steps after each flush may be slower.", RuntimeWarning, stacklevel=4)
        return BackgroundWriter(TraceWriter(self.path))

    # -- supported seams for benchmarks -------------------------------------------------------
    @property
    def helper_pids(self) -> list[int]:
        """Pids of the helper processes writing this recording (the writer), to pin or pause them."""
        return list(self.writer.pids)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the writer is running within `timeout_s` (a block never waits for it on its own:
        what it is sent waits in its pipe)."""
        return self.writer.wait_ready(timeout_s)

    def pause(self) -> None:
        """Stop recording steps until `resume()` (A/B benchmarks: the trace then has gaps)."""
        self.steps.active = False

    def resume(self) -> None:
        self.steps.active = self._generating

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
        if self.devices is not None:
            self.devices.take(record.gen_id, RELEASED_STEP)
            self._write_devices(record.gen_id, layers=False)
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
                                  prompt_text=text if self.options.store_prompts else None)
        self.generations.append(record)
        record.baseline = self._reading()
        if self.devices is not None:
            self.devices.take(gen_id, BASELINE_STEP)
        self.allocator.reset_peaks()
        record.started_ns = time.perf_counter_ns() - self.origin_ns
        self.writer.send(GenerationWindow(gen_id, record.started_ns))  # the window of its NVML peak
        self.steps.begin(gen_id)
        self._generating = True
        if self.head_stats is not None:
            self.head_stats.begin_generation(gen_id)
        return record

    def _end_generation(self, record: GenerationRecord, output: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        record.ended_ns = time.perf_counter_ns() - self.origin_ns
        self._generating = False
        gen = self.steps.gen
        reading = self.allocator.read()
        record.post_return = (reading.allocated if reading else None, reading.reserved if reading else None,
                              self.nvml.used())
        # NVML: the boundary reads here; the writer adds the highest reading it polled meanwhile.
        record.peak = (reading.peak_allocated if reading else None, reading.peak_reserved if reading else None,
                       max_or_none(record.baseline[2], record.post_return[2]))
        record.take_steps(gen)
        if gen.step and not gen.cache_seen and not gen.failed_steps:
            self._no_cache(record, gen)
        record.new_tokens, record.eos_reached = generated_tokens(self.model, output, args, kwargs, gen.step,
                                                                 gen.prompt_tokens)
        if self.options.store_prompts and record.prompt_text is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor):
                record.prompt_text = json.dumps(ids[0].tolist())
        self._write_events(gen.events, record.gen_id)
        self._write_head_stats()
        self._write_devices(record.gen_id, layers=True)
        # No wait: generate returns while the writer thread writes the last parts (settle() and the
        # end of the `with` block wait for them, and report any write error).
        self.steps.end(wait=False)
        self.writer.send(GenerationWindow(record.gen_id, record.started_ns, record.ended_ns))
        self._pending = record

    def _no_cache(self, record: GenerationRecord, gen: GenerationSteps) -> None:
        """No cache object or recurrent state found at any step: the trace would show 0 bytes and no
        layers as if the model held nothing. Say so: a warning, a `no_cache` event, and at the end of
        the block `cache_seen: false` in the run's options."""
        self.no_cache_generations.append(record.gen_id)
        message = (f"kvscope: no cache seen in generation {record.gen_id} ({self.layout.model_type}, "
                   f"{gen.step} steps): neither the model's outputs, its forward keywords nor its modules "
                   "held a cache or recurrent state the recorder can read, so the trace has no layer rows and "
                   "0 KV bytes for it (generate(use_cache=False), or a container kvscope does not know).")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        gen.events.append({"kind": "no_cache", "step": None, "detail": {
            "source": "cache_walk", "model_type": self.layout.model_type, "steps": gen.step,
            "cache_class": gen.cache_class, "message": message}})

    def _abort_generation(self, record: GenerationRecord, exc: BaseException) -> None:
        self._generating = False
        steps, gen = self.steps, self.steps.gen
        last = steps.last
        reading = last.pop("allocator", None)
        last["allocator"] = reading._asdict() if reading is not None else None
        detail: dict[str, Any] = {"exception": type(exc).__name__, "message": str(exc)[:4000], "last_step": last}
        is_oom = isinstance(exc, OOM_ERRORS)
        if is_oom:
            detail["allocator_now"] = self.allocator.snapshot() if self.allocator.enabled else None
            detail["nvml_used_bytes"] = self.nvml.used()
        self._write_events(gen.events, record.gen_id)
        self._event("oom" if is_oom else "error", record.gen_id, gen.step, detail)
        self._write_head_stats()
        self._write_devices(record.gen_id, layers=True)
        self.writer.send(GenerationWindow(record.gen_id, record.started_ns, time.perf_counter_ns() - self.origin_ns))
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
        self.writer.send(Rows("generations", tuple(row), [tuple(row.values())]))

    def _write_head_stats(self) -> None:
        if self.head_stats is not None:
            columns = self.head_stats.drain()
            self.writer.send(Rows("head_stats", tuple(columns), list(zip(*columns.values(), strict=True))))
            for error in self.head_stats.drain_errors():  # statistics skipped, generation unchanged
                self._event("error", error.get("gen_id"), error.get("step"), error)

    def _write_events(self, events: list[dict[str, Any]], gen_id: int) -> None:
        for event in events:
            self._event(event["kind"], gen_id, event.get("step"), event["detail"])
        events.clear()

    def _event(self, kind: str, gen_id: int | None, step: int | None, detail: dict[str, Any]) -> None:
        row = (self.run_id, gen_id, step, time.perf_counter_ns() - self.origin_ns, kind,
               json.dumps(detail, default=str))
        self.writer.send(Rows("events", EVENT_COLUMNS, [row]))


def record(model: torch.nn.Module, path: str | Path, options: RecordOptions | None = None,
           **keywords: Any) -> Recording:
    """Record the KV cache of every `model.generate(...)` call made inside the `with` block.

    Options: a `RecordOptions`, or its fields as keywords: labels, sample_kv_every (0 = off),
    sample_layers, max_sample_bytes, flush_every (≤ 64), nvml ("auto", True, False), nvml_interval_ms
    (how often the writer's thread polls NVML, default 1), store_prompts, model_name, tokenizer,
    head_stats_every (0 = off: per-head statistics every N steps, see docs/kernels.md), writer ("auto",
    "process", "thread"), native ("auto": a cached build of the C++ fast path, True, False). See
    docs/recorder.md.
    """
    return Recording(model, path, options, **keywords)
