"""Memory readings: PyTorch's caching allocator (one stats call) and NVML, both optional.

Costs on the H100 host: ``torch.cuda.memory_stats()`` ~79 µs (it flattens a nested dict in
Python; the nested dict it starts from is what we read), ``nvmlDeviceGetMemoryInfo`` ~9 µs, while
``memory_allocated()`` + ``memory_reserved()`` cost 225 µs together: never use the convenience
getters per step. Without CUDA or NVML every reading is None (null in the trace), never 0.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, NamedTuple, Protocol

import torch

from kvscope.errors import RecordingError


class AllocatorReading(NamedTuple):  # a tuple: built every step, so cheaper than a frozen dataclass
    allocated: int
    reserved: int
    active: int
    inactive_split: int
    alloc_retries: int
    num_ooms: int
    peak_allocated: int
    peak_reserved: int


_new_reading = tuple.__new__  # builds the named tuple in C (its generated __new__ is Python code)


def _nested_stats_reader() -> Any:
    # The C entry point returns the nested dict that memory_stats() would flatten afterwards.
    raw = getattr(torch._C, "_cuda_memoryStats", None)
    if raw is not None:
        return raw
    return lambda device: torch.cuda.memory.memory_stats_as_nested_dict(device)


class AllocatorProbe:
    """Reads the caching allocator of the model's CUDA device(s), one stats call per device."""

    def __init__(self, devices: tuple[int, ...], native: Any = None) -> None:
        self.devices = devices if torch.cuda.is_available() else ()
        self._read = _nested_stats_reader() if self.devices else None
        # The C++ fast path's reader (8 ints straight from the allocator), where this torch has
        # the device-allocator API; it answers None where it cannot read, and the stats call does.
        self._native_read = native.allocator_stats if native is not None and self.devices else None

    @property
    def enabled(self) -> bool:
        return bool(self.devices)

    def read(self) -> AllocatorReading | None:
        if not self.devices:
            return None
        if len(self.devices) == 1:  # the usual case, every step: no summing
            return _new_reading(AllocatorReading, self._device_values(self.devices[0]))
        per_device = [self._device_values(device) for device in self.devices]
        return _new_reading(AllocatorReading, tuple(map(sum, zip(*per_device, strict=True))))

    def _device_values(self, device: int) -> tuple[int, ...]:
        """One device's reading, in `AllocatorReading` order, from one nested stats call."""
        if self._native_read is not None:
            values = self._native_read(device)
            if values is not None:
                return values
        stats = self._read(device)
        allocated = stats["allocated_bytes"]["all"]
        reserved = stats["reserved_bytes"]["all"]
        return (allocated["current"], reserved["current"], stats["active_bytes"]["all"]["current"],
                stats["inactive_split_bytes"]["all"]["current"], stats["num_alloc_retries"], stats["num_ooms"],
                allocated["peak"], reserved["peak"])

    def reset_peaks(self) -> None:
        for device in self.devices:
            torch.cuda.reset_peak_memory_stats(device)

    def snapshot(self) -> dict[str, Any]:
        """The full flattened stats of each device, for an OOM event (cost does not matter there)."""
        return {str(d): {k: v for k, v in torch.cuda.memory_stats(d).items() if ".all." in k or "num_" in k}
                for d in self.devices}

    def empty_cache(self) -> None:
        if self.devices:
            torch.cuda.empty_cache()


class NvmlProbe:
    """NVML used/total memory of the model's device(s). mode: "auto", True (required) or False."""

    def __init__(self, devices: tuple[int, ...], mode: str | bool = "auto") -> None:
        self.handles: list[Any] = []
        self.driver_version: str | None = None
        self.total: int | None = None
        self._pynvml: Any = None
        if mode is False or mode == "off" or not devices or not torch.cuda.is_available():
            if mode is True:
                raise RecordingError("nvml=True needs a CUDA device, and the model has none.")
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [self._handle(pynvml, d) for d in devices]
            version = pynvml.nvmlSystemGetDriverVersion()
            self.driver_version = version.decode() if isinstance(version, bytes) else str(version)
            self._pynvml = pynvml
            self.total = sum(pynvml.nvmlDeviceGetMemoryInfo(h).total for h in self.handles)
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "no NVML readings"
            self.handles = []
            if mode is True:
                raise RecordingError(f"nvml=True but NVML is unavailable ({exc}); install nvidia-ml-py.") from exc

    @staticmethod
    def _handle(pynvml: Any, device: int) -> Any:
        # Match by UUID: CUDA_VISIBLE_DEVICES may renumber devices relative to NVML's order.
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:  # noqa: BLE001 - fall back to the index
                pass
        return pynvml.nvmlDeviceGetHandleByIndex(device)

    @property
    def enabled(self) -> bool:
        return bool(self.handles)

    def device_ids(self) -> list[str]:
        """NVML UUIDs of the handles (what the polling process opens)."""
        ids = []
        for handle in self.handles:
            uuid = self._pynvml.nvmlDeviceGetUUID(handle)
            ids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        return ids

    def used(self) -> int | None:
        if not self.handles:
            return None
        get = self._pynvml.nvmlDeviceGetMemoryInfo
        return sum(get(h).used for h in self.handles)


class NvmlSource(Protocol):
    """Per-step NVML readings: `nvml_poller.NvmlPoller` (a process) or `NvmlSampler` (a thread)."""

    per_step_requests: bool  # whether the hook must call request(gen_id, step) every step
    description: str  # for the run's options
    latest: int | None

    def request(self, gen_id: int, step: int) -> None: ...
    def begin(self, gen_id: int) -> None: ...
    def take(self, keys: list[tuple[int, int]], times_ns: list[int]) -> list[int | None]: ...
    def peak(self, gen_id: int) -> int | None: ...
    def close(self) -> None: ...


class NvmlSampler:
    """Takes each step's NVML reading on a thread of this process: the fallback when the polling
    process (`nvml_poller.NvmlPoller`, the default) cannot start.

    The hook queues the step's key (about 1 µs); this thread reads NVML right after (ctypes
    releases the GIL during the call) and keeps the value per key, and the writer thread fills the
    steps rows from it. It costs the decode loop GIL hand-overs every step (see nvml_poller.py).
    """

    per_step_requests = True
    description = "thread, one reading per step"

    def __init__(self, probe: NvmlProbe) -> None:
        self.probe = probe
        self.latest: int | None = None
        self._pending: deque[tuple[int, int]] = deque()
        self._values: dict[tuple[int, int], int | None] = {}
        self._peaks: dict[int, int] = {}
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvscope-nvml", daemon=True)
        self._thread.start()

    def request(self, gen_id: int, step: int) -> None:
        """Ask for the reading of this step (called from the hook: no NVML call here)."""
        self._idle.clear()
        self._pending.append((gen_id, step))
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                keys = []
                while self._pending:
                    keys.append(self._pending.popleft())
                used = self.probe.used()
                self.latest = used
                for key in keys:
                    self._values[key] = used
                    if used is not None and used > self._peaks.get(key[0], -1):
                        self._peaks[key[0]] = used
            self._idle.set()
            if self._stopping:
                return

    def wait(self, timeout: float = 5.0) -> None:
        """Block until every requested reading has been taken."""
        if self._pending or not self._idle.is_set():
            self._wake.set()
            self._idle.wait(timeout)

    def begin(self, gen_id: int) -> None:
        """Nothing to do: readings are keyed by step."""

    def take(self, keys: list[tuple[int, int]], times_ns: list[int] | None = None) -> list[int | None]:
        """The readings of these steps (waiting for any still pending), removed from the sampler."""
        if any(key not in self._values for key in keys):
            self.wait()
        return [self._values.pop(key, None) for key in keys]

    def peak(self, gen_id: int) -> int | None:
        self.wait()
        return self._peaks.get(gen_id)

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5.0)


def start_nvml_sampler(probe: NvmlProbe, origin_ns: int, interval_s: float | None = None) -> NvmlSource:
    """The per-step NVML source: the polling process, or this process's thread if it cannot start."""
    from kvscope.recorder.nvml_poller import POLL_INTERVAL_S, NvmlPoller

    try:
        return NvmlPoller(probe.device_ids(), origin_ns, interval_s or POLL_INTERVAL_S)
    except (RecordingError, OSError) as exc:
        import warnings

        warnings.warn(f"kvscope: NVML is read on a thread instead ({exc}); the decode loop pays for it.",
                      RuntimeWarning, stacklevel=3)
        return NvmlSampler(probe)


def memory_limit(devices: tuple[int, ...], nvml_total: int | None) -> tuple[int | None, dict[str, Any] | None]:
    """The device memory this process may use when something caps it below the device's total.

    Read once, when a recording starts: `torch.cuda.set_per_process_memory_fraction` (the caching
    allocator refuses to reserve past fraction × the device's memory), a MIG slice (torch sees less
    memory than NVML reports for the handle) and an MPS limit (`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`).
    Returns (bytes summed over the devices, how it was found) or (None, None) when nothing caps it.
    """
    if not devices or not torch.cuda.is_available():
        return None, None
    import os

    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    total_limit, sources = 0, []
    for device in devices:
        device_total = int(torch.cuda.get_device_properties(device).total_memory)
        limit = device_total
        fraction = float(get_fraction(device)) if get_fraction is not None else 1.0
        if fraction < 1.0:
            limit = int(fraction * device_total)
            sources.append({"device": device, "kind": "per_process_memory_fraction", "fraction": fraction,
                            "device_bytes": device_total})
        total_limit += limit
    if nvml_total is not None and total_limit < 0.9 * nvml_total and not sources:
        # torch sees far less memory than NVML's handle (they differ by ~1% on a whole GPU): a MIG slice
        sources.append({"kind": "mig_or_visible_memory", "torch_total_bytes": total_limit, "nvml_total_bytes": nvml_total})
    mps = os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")
    if mps:
        sources.append({"kind": "mps_pinned_device_mem_limit", "value": mps})
        total_limit = min(total_limit, _mps_limit_bytes(mps, devices) or total_limit)
    if not sources:
        return None, None
    return total_limit, {"bytes": total_limit, "sources": sources}


def _mps_limit_bytes(value: str, devices: tuple[int, ...]) -> int | None:
    """`0=2G,1=4096M` or `2G` (applies to every device) in bytes, summed over `devices`."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    per_device: dict[int | None, int] = {}
    for item in value.split(","):
        key, _, amount = item.strip().rpartition("=")
        amount = amount.strip().upper().removesuffix("B")
        unit = amount[-1:] if amount[-1:] in units and not amount[-1:].isdigit() else ""
        number = amount[: len(amount) - len(unit)]
        try:
            per_device[int(key) if key else None] = int(float(number) * units[unit])
        except ValueError:
            return None
    found = [per_device.get(d, per_device.get(None)) for d in devices]
    return sum(found) if all(v is not None for v in found) else None  # type: ignore[misc]
