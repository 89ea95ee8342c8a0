"""NVML, read one way: boundary reads in the recording process, and a polling thread in the writer.

`NvmlProbe` answers the readings taken at generate boundaries (baseline, post-return, settle) and
the run row's driver version and total. `NvmlPolling` reads NVML every `interval_s` on a thread of
the writer (the writer process where there is one: its GIL is not `generate`'s) and gives each
step the first reading taken at or after the step, and each generation the highest reading taken
while it ran. The hook itself does nothing for NVML. Times are `time.perf_counter_ns()`
(CLOCK_MONOTONIC, shared by every process on Linux). No torch at import: the writer child imports it.
"""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from kvscope.errors import RecordingError

FAKE_DEVICE = "fake"  # reads a counter instead of NVML (tests on machines without a GPU)
STEP_WAIT_S = 0.25  # how long a batch waits for the reading that follows its last step


class NvmlProbe:
    """NVML used/total memory of the model's device(s). mode: "auto", True (required) or False."""

    def __init__(self, devices: tuple[int, ...], mode: str | bool = "auto") -> None:
        import torch

        self.handles: list[Any] = []
        self.devices = devices  # the CUDA index of each handle
        self.driver_version: str | None = None
        self.total: int | None = None
        self._pynvml: Any = None
        if mode is False or not devices or not torch.cuda.is_available():
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
        import torch

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
        """NVML UUIDs of the handles (what the polling thread opens)."""
        ids = []
        for handle in self.handles:
            uuid = self._pynvml.nvmlDeviceGetUUID(handle)
            ids.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        return ids

    def memory_of(self, device: int) -> tuple[int | None, int | None]:
        """(used, total) bytes of one of the model's devices, (None, None) without NVML."""
        if not self.handles or device not in self.devices:
            return None, None
        info = self._pynvml.nvmlDeviceGetMemoryInfo(self.handles[self.devices.index(device)])
        return int(info.used), int(info.total)

    def used(self) -> int | None:
        if not self.handles:
            return None
        get = self._pynvml.nvmlDeviceGetMemoryInfo
        return sum(get(h).used for h in self.handles)


def used_reader(devices: list[str]) -> Callable[[], int]:
    """A function returning NVML used bytes summed over `devices` (UUIDs or indices, or "fake")."""
    if devices == [FAKE_DEVICE]:
        counter = [0]

        def fake() -> int:
            counter[0] += 1
            return 1_000_000 + counter[0]
        return fake
    import pynvml

    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByUUID(d) if d.startswith("GPU-") else pynvml.nvmlDeviceGetHandleByIndex(int(d))
               for d in devices]
    get = pynvml.nvmlDeviceGetMemoryInfo
    return lambda: sum(get(h).used for h in handles)


class NvmlPolling:
    """Polls NVML on a daemon thread; `take` and `end` match readings to steps and generations.

    Readings are kept only as long as a step or an open generation may still need them.
    """

    def __init__(self, devices: list[str], origin_ns: int, interval_s: float) -> None:
        self.origin_ns = origin_ns
        self.interval_s = interval_s
        self._read = used_reader(devices)
        self._read()  # fails here, not on the thread, when NVML cannot be read
        self._times, self._values = array("q"), array("q")
        self._lock = threading.Lock()
        self._new_reading = threading.Condition(self._lock)
        self._open: dict[int, int] = {}  # gen_id -> absolute start of an open generation
        self._peaks: dict[int, int] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvscope-nvml", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            start = time.perf_counter_ns()
            try:
                value = self._read()
            except Exception:  # noqa: BLE001 - NVML went away: later steps get no reading (null)
                self._stopped.set()
                break
            with self._lock:
                self._times.append(start)
                self._values.append(value)
                self._new_reading.notify_all()
            self._stopped.wait(max(self.interval_s - (time.perf_counter_ns() - start) / 1e9, 0.0))
        with self._lock:
            self._new_reading.notify_all()

    def _wait_for(self, absolute_ns: int) -> None:
        """Wait (under the lock) until a reading taken at or after `absolute_ns` arrived, or the timeout."""
        deadline = time.monotonic() + STEP_WAIT_S
        while not (self._times and self._times[-1] >= absolute_ns) and not self._stopped.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._new_reading.wait(left)

    def _trim(self, needed_from_ns: int) -> None:
        """Drop readings no later step or open generation needs (keeping one before `needed_from_ns`)."""
        oldest = min([needed_from_ns, *self._open.values()])
        keep = max(bisect_left(self._times, oldest) - 1, 0)
        if keep:
            del self._times[:keep], self._values[:keep]

    def take(self, times_ns: list[int]) -> list[int | None]:
        """Readings for steps at these times (ns since origin): the first taken at or after each; None
        where none came (polling stopped, or fell more than the wait behind)."""
        if not times_ns:
            return []
        absolute = [t + self.origin_ns for t in times_ns]
        with self._lock:
            self._wait_for(max(absolute))
            times, values, count = self._times, self._values, len(self._times)
            found = [bisect_left(times, t) for t in absolute]
            result = [values[i] if i < count else None for i in found]
            self._trim(min(absolute))
        return result

    def begin(self, gen_id: int, started_ns: int) -> None:
        with self._lock:
            self._open[gen_id] = started_ns + self.origin_ns

    def end(self, gen_id: int, ended_ns: int) -> None:
        """Close the generation's window: its peak is the highest reading from its start to the first
        reading at or after its end."""
        with self._lock:
            start = self._open.pop(gen_id, None)
            if start is None:
                return
            self._wait_for(ended_ns + self.origin_ns)
            first = bisect_left(self._times, start)
            last = bisect_left(self._times, ended_ns + self.origin_ns) + 1
            inside = self._values[first:last]
            if inside:
                self._peaks[gen_id] = max(inside)

    def peak(self, gen_id: int) -> int | None:
        return self._peaks.get(gen_id)

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
