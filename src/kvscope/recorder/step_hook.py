"""The per-step hot path: one forward hook on the model, rows buffered as tuples.

Budget: about 1% of an 11–12 ms decode step (~115 µs) for the 24-layer pythia-1.4b twin on the H100
host. The hook reads the cache's tensor facts once (`measure.py`), makes one allocator stats call
and appends tuples; NVML is polled by the writer (`nvml.py`), which also expands and encodes the
rows (`batch_writer.py`, in the writer process `writer_process.py`). It times itself and stores that time per step
as `recorder_ns`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

import torch

from kvscope.recorder.allocator import AllocatorProbe
from kvscope.recorder.batch_writer import Steps
from kvscope.recorder.cache_walk import MODULE_STATE_MODELS, ModuleState
from kvscope.recorder.columns import ALLOCATOR_COLUMNS
from kvscope.recorder.hooks import AttentionDiscovery, batch_and_tokens, cache_from_kwargs, cache_from_output
from kvscope.recorder.measure import measure_cache
from kvscope.recorder.model_layout import ModelLayout
from kvscope.recorder.writer_thread import BackgroundWriter, Samples

NO_READING = (None,) * len(ALLOCATOR_COLUMNS)

@dataclass
class SamplePolicy:
    """Which K/V to copy: every `every` steps (0 = never), these layers (None = all), within a budget."""

    every: int = 0
    layers: frozenset[int] | None = None
    max_bytes: int = 256 * 2**20
    used_bytes: int = 0
    exhausted: bool = False
    # CUDA: one pinned host buffer of max_bytes; samples are copied into it asynchronously, so the
    # decode loop never waits for a device-to-host copy and the writer thread stays idle meanwhile.
    staging: torch.Tensor | None = None

    def prepare(self, cuda: bool) -> None:
        if cuda and self.every > 0 and self.max_bytes > 0 and self.staging is None:
            self.staging = torch.empty(self.max_bytes, dtype=torch.uint8, pin_memory=True)

    def layers_at(self, step: int) -> Container[int] | None:
        if self.every <= 0 or self.exhausted or step % self.every:
            return None
        return self.layers if self.layers is not None else ALL_LAYERS


def _in_flight(cache: Any, tensors: list[tuple[int, str, torch.Tensor]]) -> bool:
    """Whether sampled tensors may still be moving: an offloaded cache copies layers to and from the
    host with non-blocking copies (on a prefetch stream), so a value read now could be stale."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    container = getattr(cache, "self_attention_cache", cache)
    if getattr(container, "offloading", False) or hasattr(container, "prefetch_stream"):
        return True
    return any(t.is_cuda for _, _, t in tensors) and not all(t.is_cuda for _, _, t in tensors)


class _AllLayers:
    def __contains__(self, layer: object) -> bool:
        return True


ALL_LAYERS = _AllLayers()


@dataclass
class GenerationSteps:
    """What the hook learns about one generation: begun fresh for each, read by the session at its end."""

    gen_id: int
    step: int = 0  # steps recorded so far (the next step's index)
    seq_len: int = 0  # tokens in context after the last step
    batch_size: int = 1
    prompt_tokens: int = 0
    cache_class: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    cache_seen: bool = False  # a cache (or recurrent state) was found at some step
    failed_steps: int = 0  # steps whose cache could not be read (`_cache_read_failed`)
    failure: dict[str, Any] | None = None  # the generation's one error event for those steps
    cache_attr: str | None = None  # the output attribute that carries the cache
    last_measured: Any = None
    last_t_ns: int = 0
    last_reading: Any = None
    carry_ns: int = 0  # hand-over time booked into the next step's recorder_ns

    @property
    def last_kv_bytes(self) -> int:
        """Unique KV bytes of the last recorded step (computed on demand: the hook defers it)."""
        return self.last_measured.kv_bytes if self.last_measured is not None else 0

    @property
    def last_layers(self) -> int:
        return self.last_measured.layer_count if self.last_measured is not None else 0


class StepRecorder:
    """Records the steps of one generation at a time; the session owns its lifecycle."""

    def __init__(self, run_id: str, layout: ModelLayout, allocator: AllocatorProbe, nvml_total: int | None,
                 writer: Any, sample_writer: BackgroundWriter, discovery: AttentionDiscovery, flush_every: int,
                 samples: SamplePolicy, origin_ns: int, native: Any = None) -> None:
        self.run_id = run_id
        self.native = native  # the C++ fast path (recorder/native) or None
        self.layout = layout
        self.allocator = allocator
        self.nvml_total = nvml_total
        self.writer = writer
        self.sample_writer = sample_writer
        self.discovery = discovery
        self.flush_every = flush_every
        self.samples = samples
        self.origin_ns = origin_ns
        self.active = False
        self._step_rows: list[tuple] = []
        self._layer_rows: list[tuple] = []
        self._sample_ready: Any = None
        self._sample_rows: list[tuple] = []
        self.device_rows: Any = None  # devices.DeviceRows of a model split over devices, else None
        self.module_state: ModuleState | None = None  # where the model keeps state on its modules
        self._module_state_searched = False
        self.begin(-1)

    def begin(self, gen_id: int) -> None:
        self.gen = GenerationSteps(gen_id)
        self.active = gen_id >= 0
        if self.active and self.discovery.modules:
            self.discovery.install()

    def end(self, *, wait: bool) -> None:
        """Hand the buffered rows to the writer and flush (waiting for the parts when asked)."""
        self.active = False
        self.discovery.remove()
        self._hand_over()
        self.writer.flush(wait=wait)
        # Samples are serialised after the generation, off the decode loop (see SamplePolicy.staging).
        if self._sample_rows:
            self.sample_writer.send(Samples(self._sample_rows, self._sample_ready))
        self._sample_rows, self._sample_ready = [], None

    def _hand_over(self) -> None:
        if self._step_rows or self._layer_rows:
            self.writer.send(Steps(self._step_rows, self._layer_rows))
        self._step_rows, self._layer_rows = [], []

    def on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Forward hook on the model `generate` calls: one call per step."""
        if not self.active:
            return
        start = time.perf_counter_ns()
        batch, tokens = batch_and_tokens(args, kwargs)
        gen = self.gen
        step = gen.step
        if step == 0:
            gen.prompt_tokens = tokens
            gen.batch_size = batch
        gen.seq_len += tokens
        gen_id, run_id = gen.gen_id, self.run_id
        cache: Any = None
        try:  # whatever the cache holds, reading it never breaks the generation
            cache, gen.cache_attr = cache_from_output(output, gen.cache_attr)
            if cache is None:
                cache = self.discovery.cache if self.discovery.cache is not None else cache_from_kwargs(kwargs)
            elif step == 0 and self.discovery.installed:
                self.discovery.remove()  # the output carries the cache: later steps need no attention hooks
            self.discovery.cache = None
            if step == 0:
                gen.cache_class = type(cache).__name__ if cache is not None else None
            if self.module_state is not None:
                cache = self.module_state.read(cache)  # state kept on the model's modules (recurrent_gemma)
            sample_layers = self.samples.layers_at(step)
            measured = measure_cache(cache, self.layout, gen.seq_len, sample_layers, self.native) \
                if cache is not None else None
            if not gen.cache_seen:
                if step == 0 and not self._module_state_searched and (
                        measured is None or not measured.layer_count or self.layout.model_type in MODULE_STATE_MODELS):
                    self._module_state_searched = True  # once per recording: the state lives on the same modules
                    self.module_state = ModuleState.find(module)
                    if self.module_state is not None:
                        cache = self.module_state.read(cache)
                        measured = measure_cache(cache, self.layout, gen.seq_len, sample_layers, self.native)
                gen.cache_seen = measured is not None and measured.layer_count > 0
            if measured is not None and measured.sample_tensors:
                if _in_flight(cache, measured.sample_tensors):
                    torch.cuda.synchronize()  # offloading moves layers on side streams: wait before copying
                self._copy_samples(measured.sample_tensors, step)
                measured.sample_tensors = None  # never keep a cache tensor past the hook
        except Exception as exc:  # noqa: BLE001 - reported as an error event, the step's rows skipped
            del cache
            self.discovery.cache = None
            self._cache_read_failed(step, exc)
            return
        if measured is not None:
            # Expanded into rows (and the step's unique bytes) by the writer, per batch.
            self._layer_rows.append((run_id, gen_id, step, gen.seq_len, measured))
        del cache
        reading = self.allocator.read()
        if self.device_rows is not None:  # split over devices: each one's readings too
            self.device_rows.take(gen_id, step)
        self._end_step(start, step, batch, measured, reading)

    def _cache_read_failed(self, step: int, exc: Exception) -> None:
        """A step whose cache could not be read: no steps or layers row (a half-read step would show
        wrong bytes), one `error` event per generation (counting the steps that failed), and the
        generation goes on."""
        gen = self.gen
        gen.step = step + 1
        gen.last_measured = None
        gen.failed_steps += 1
        if gen.failure is None:
            gen.failure = {"source": "cache_walk", "exception": type(exc).__name__, "message": str(exc)[:2000],
                           "first_step": step, "last_step": step, "failed_steps": 1}
            gen.events.append({"kind": "error", "step": step, "detail": gen.failure})
            warnings.warn(f"kvscope: could not read the cache at step {step} of generation {gen.gen_id} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); that step's rows are skipped, "
                          "generation goes on (an error event says which steps).", RuntimeWarning, stacklevel=2)
        else:
            gen.failure["last_step"] = step
            gen.failure["failed_steps"] += 1

    def _end_step(self, start: int, step: int, batch: int, measured: Any, reading: Any) -> None:
        """Buffer the step's row and hand a full batch to the writer."""
        gen = self.gen
        gen.last_measured = measured
        t_ns = start - self.origin_ns
        gen.last_t_ns, gen.last_reading = t_ns, reading
        gen.step = step + 1
        # The reading's first six fields are columns.ALLOCATOR_COLUMNS.
        telemetry: tuple = NO_READING if reading is None else reading[:6]
        # The hand-over below is timed into the next step's recorder_ns (this row is already built).
        spent = time.perf_counter_ns() - start + gen.carry_ns
        # In columns.HOOK_STEP_COLUMNS order (tested); the writer fills in the rest of the row.
        self._step_rows.append((self.run_id, gen.gen_id, step, t_ns, gen.seq_len, batch, *telemetry,
                                self.nvml_total, spent))
        gen.carry_ns = 0
        if gen.step % self.flush_every == 0:
            handover_start = time.perf_counter_ns()
            self._hand_over()
            self.writer.flush()
            gen.carry_ns = time.perf_counter_ns() - handover_start

    @property
    def last(self) -> dict[str, Any]:
        """The last recorded step's readings (for OOM events and the generation summary), built on
        demand rather than every step."""
        gen = self.gen
        if gen.step == 0:
            return {}
        return {"step": gen.step - 1, "t_ns": gen.last_t_ns, "seq_len": gen.seq_len,
                "allocator": gen.last_reading, "layers": gen.last_layers, "kv_bytes": gen.last_kv_bytes}

    def _copy_samples(self, tensors: list[tuple[int, str, torch.Tensor]], step: int) -> None:
        policy = self.samples
        for layer, name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if policy.used_bytes + size > policy.max_bytes:
                policy.exhausted = True
                self.gen.events.append({"kind": "samples_budget", "step": step,
                                    "detail": {"max_sample_bytes": policy.max_bytes, "used_bytes": policy.used_bytes}})
                return
            offset = policy.used_bytes
            policy.used_bytes += (size + 15) // 16 * 16  # keep every sample 16-byte aligned
            if policy.staging is not None and tensor.is_cuda:
                host = policy.staging[offset:offset + size].view(tensor.dtype).view(tensor.shape)
                host.copy_(tensor.detach(), non_blocking=True)
            else:
                # A real copy: static caches are written in place, and the cache must not be pinned.
                host = tensor.detach().clone(memory_format=torch.contiguous_format)
            self._sample_rows.append((self.run_id, self.gen.gen_id, step, layer, name, tuple(host.shape),
                                      str(host.dtype).removeprefix("torch."), host))
        if tensors and tensors[0][2].is_cuda:
            self._sample_ready = torch.cuda.Event()
            self._sample_ready.record()
