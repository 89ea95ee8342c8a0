"""Per-step NVML readings from a separate polling process, so the decode loop never pays for them.

Inside `generate` an NVML call takes about 100 µs, and a sampler *thread* (the previous design)
cost the decode loop more than the calls themselves: every wake-up and every return from NVML
needs the GIL, and handing the GIL back and forth with the thread that runs `generate` costs
context switches on every step (measured on the H200 host: 2.7% longer decode steps with the
thread, against 1.0% of recorder time inside the hook). A process shares no GIL. It polls NVML
every `interval_s` into a ring in shared memory (`nvml_child.py`); the writer (process) gives each
step the first reading taken at or after the step's time, and each generation the highest reading
taken while it ran. The hook itself does nothing for NVML.
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kvscope.errors import RecordingError

POLL_INTERVAL_S = 0.001
RING_SLOTS = 1 << 16  # 65 s of readings at 1 kHz; the writer consumes them every flush (< 1 s)
_SAFE_SLOTS = RING_SLOTS - 1024  # never read the slots the child may be overwriting


class NvmlPoller:
    """Starts the polling process and matches its readings to steps and generations.

    `devices`: NVML device UUIDs ("GPU-...") or indices; "fake" reads a counter (tests).
    Raises `RecordingError` when the process cannot start or NVML fails in it.
    """

    per_step_requests = False  # the hook need not announce steps (see NvmlSampler)

    def __init__(self, devices: list[str], origin_ns: int, interval_s: float = POLL_INTERVAL_S,
                 start_timeout_s: float = 20.0) -> None:
        self.origin_ns = origin_ns
        self.interval_s = interval_s
        self.description = f"process, polled every {interval_s * 1e3:g} ms"
        fd, name = tempfile.mkstemp(prefix="kvscope-nvml-", suffix=".ring")
        try:
            os.ftruncate(fd, 8 * (1 + 2 * RING_SLOTS))
            self._map = mmap.mmap(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        # Kept open for the writer process, which maps the same ring (`attach`).
        self.ring_fd: int | None = fd
        self._ring = np.frombuffer(self._map, dtype=np.int64)
        child = Path(__file__).with_name("nvml_child.py")
        try:
            self._process = subprocess.Popen(
                [sys.executable, str(child), name, str(int(interval_s * 1e6)), *devices],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            line = self._first_line(start_timeout_s)
        finally:
            os.unlink(name)  # both sides hold the mapping; no file is left behind, even after a crash
        if line != "ready":
            self._ring = np.empty(0, dtype=np.int64)
            self._stop_process()
            self._release_map()
            os.close(fd)
            raise RecordingError(f"the NVML polling process did not start ({line or 'no answer'})")
        self._init_reader(keep_history=True)

    @classmethod
    def attach(cls, ring_fd: int, origin_ns: int, interval_s: float = POLL_INTERVAL_S) -> NvmlPoller:
        """A reader of a ring another process polls into (the writer process's view): `take` works,
        the polling process is not this object's to stop."""
        self = cls.__new__(cls)
        self.origin_ns, self.interval_s = origin_ns, interval_s
        self._map = mmap.mmap(ring_fd, 0, access=mmap.ACCESS_READ)
        self.ring_fd = None
        self._ring = np.frombuffer(self._map, dtype=np.int64)
        self._process = None
        self._init_reader(keep_history=True)
        return self

    def _init_reader(self, *, keep_history: bool) -> None:
        # keep_history: keep readings until `take` matches them to steps. A poller whose steps are
        # matched by another reader (the writer process) keeps only the latest reading and peaks.
        self.keep_history = keep_history
        self._lock = threading.Lock()
        self._seen = 0
        self._times = np.empty(0, dtype=np.int64)
        self._values = np.empty(0, dtype=np.int64)
        self.latest: int | None = None
        self._gen: tuple[int, int] | None = None  # (gen_id, absolute start ns) of the open generation
        self._peaks: dict[int, int] = {}

    def _first_line(self, timeout_s: float) -> str:
        stdout = self._process.stdout
        assert stdout is not None
        readable, _, _ = select.select([stdout], [], [], timeout_s)
        return stdout.readline().strip() if readable else ""

    # -- reading the ring (writer and main thread, under the lock) -------------------------
    def _scan(self) -> None:
        if not len(self._ring):  # closed
            return
        count = int(self._ring[0])
        if count == self._seen:
            return
        first = max(self._seen, count - _SAFE_SLOTS)
        index = np.arange(first, count) % RING_SLOTS
        times = self._ring[1 + 2 * index].copy()
        values = self._ring[2 + 2 * index].copy()
        self._seen = count
        self.latest = int(values[-1])
        if self._gen is not None:
            gen_id, start = self._gen
            inside = values[times >= start]
            if len(inside):
                self._peaks[gen_id] = max(self._peaks.get(gen_id, -1), int(inside.max()))
        if self.keep_history:
            self._times = np.concatenate([self._times, times])
            self._values = np.concatenate([self._values, values])
        else:
            self._times, self._values = times[-1:], values[-1:]

    def _wait_for(self, absolute_ns: int, timeout_s: float = 0.25) -> None:
        """Scan until a reading taken at or after `absolute_ns` has arrived (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._scan()
            if (len(self._times) and self._times[-1] >= absolute_ns) or time.monotonic() > deadline:
                return
            if self._process is not None and self._process.poll() is not None:
                return
            time.sleep(self.interval_s)

    # -- the sampler interface (telemetry.NvmlSource) ----------------------------------------------
    def request(self, gen_id: int, step: int) -> None:
        """Not needed: readings are matched to steps by time (per_step_requests is False)."""

    def refresh(self) -> None:
        """Read the readings that arrived (so a long generation's peak sees all of them: the ring
        holds about a minute)."""
        with self._lock:
            self._scan()

    def begin(self, gen_id: int) -> None:
        with self._lock:
            self._scan()
            self._gen = (gen_id, time.perf_counter_ns())

    def take(self, keys: list[tuple[int, int]], times_ns: list[int]) -> list[int | None]:
        """Readings for steps at these times (ns since origin): the first taken at or after each; None
        where none came (the process stopped, or fell more than the wait behind)."""
        if not times_ns:
            return []
        absolute = np.asarray(times_ns, dtype=np.int64) + self.origin_ns
        with self._lock:
            self._wait_for(int(absolute.max()))
            times, values = self._times, self._values
            if not len(times):
                return [None] * len(times_ns)
            at = np.searchsorted(times, absolute, side="left")
            found = at < len(times)
            picked = values[np.minimum(at, len(times) - 1)].tolist()
            result = [value if ok else None for value, ok in zip(picked, found.tolist(), strict=True)]
            keep = max(int(at.min()) - 1, 0)  # readings before this batch are never needed again
            self._times, self._values = times[keep:], values[keep:]
            return result

    def peak(self, gen_id: int) -> int | None:
        """The highest reading taken since `begin(gen_id)` (the generation's NVML peak)."""
        with self._lock:
            if self._gen is not None and self._gen[0] == gen_id:
                self._wait_for(time.perf_counter_ns())
                self._gen = None  # the window closes: later readings are not this generation's
            return self._peaks.get(gen_id)

    def close(self) -> None:
        self._stop_process()
        self._ring = np.empty(0, dtype=np.int64)
        self._release_map()
        if self.ring_fd is not None:
            os.close(self.ring_fd)
            self.ring_fd = None

    def _stop_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.write("stop\n")
                process.stdin.close()
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _release_map(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a numpy view still refers to it; it goes with the object
            pass
