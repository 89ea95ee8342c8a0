"""The trace writer in its own process, so encoding a batch never takes the GIL from `generate`.

As a thread, the writer's Python work per 64-step batch (about 1 ms) had to take the GIL from the
thread running `generate` dozens of times per batch; on the H100 host the decode steps right after
a flush were 3–5 ms longer, about 1% of the run. A process shares no GIL: the hook's hand-over is
one pickle and one pipe write (about 0.3 ms per batch), and the child (`writer_child.py`) expands
the batch, polls NVML on its own thread and writes the parts. Opening a block never waits for it:
what is sent before it is ready waits in the pipe (`helper_process`), and a block that ends hands
its process to the next block of this process (one helper per process, not one per block). If the
recording process dies, the child still writes every batch it received. Errors come back at the next waited flush or
at close, as `RecordingError`; a hand-over never raises inside `generate`.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable

from kvscope.errors import RecordingError
from kvscope.recorder.batch_writer import Close, Flush, Open, Sync
from kvscope.recorder.helper_process import HelperProcess

_idle: list[HelperProcess] = []  # a writer process between two blocks, for the next one
_idle_lock = threading.Lock()


def _take_helper() -> HelperProcess:
    """The idle writer process if one is alive (another block may be using none), else a new one."""
    with _idle_lock:
        while _idle:
            helper = _idle.pop()
            if helper.process.poll() is None:
                return helper
            helper.stop(timeout_s=0)
    return HelperProcess("kvscope.recorder.writer_child", [], name="writer")


def _give_back(helper: HelperProcess) -> None:
    with _idle_lock:
        if not _idle:
            _idle.append(helper)
            return
    helper.stop()  # one idle process is enough


@atexit.register
def stop_idle_writers() -> None:
    """End the idle writer process (it would also end on its own when this process's pipe closes)."""
    with _idle_lock:
        helpers, _idle[:] = list(_idle), []
    for helper in helpers:
        helper.stop(timeout_s=5)


class WriterProcess:
    """Same interface as `writer_thread.BackgroundWriter`: `send` messages, `flush`, `close`."""

    kind = "process"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.helper = _take_helper()
        self._error: RecordingError | None = None  # raised at the next wait
        self._gone = False  # the process is gone: later messages are dropped, its end reported once
        self.send(Open(self.path))

    @property
    def pids(self) -> list[int]:
        return [self.helper.pid]

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        try:
            return self.helper.wait_ready(timeout_s)
        except RecordingError as exc:
            self._gone, self._error = True, exc
            return False

    def send(self, message: object) -> None:
        if self._gone:
            return
        try:
            self.helper.send(message)
        except RecordingError as exc:
            self._gone, self._error = True, exc

    def flush(self, *, wait: bool = False) -> None:
        self.send(Flush())
        if wait:
            self._request(Sync)

    def close(self, *, compact: bool = True) -> None:
        """Finish the trace (waiting for the parts), then leave the process to the next block."""
        try:
            if not self._gone and self.helper.process.poll() is None:
                self._request(lambda seq: Close(seq, compact), raise_now=False)
            elif not self._gone:  # it died quietly: what it had not written is lost
                self._error = self.helper.failure(f"exited ({self.helper.process.returncode}) "
                                                  "before the trace was closed")
        finally:
            if self._gone or self.helper.process.poll() is not None:
                self.helper.stop()
            else:
                _give_back(self.helper)
        self._raise_pending()

    def discard(self) -> None:
        """End the process without finishing the trace (a block that failed to start)."""
        self._gone = True
        self.helper.stop()

    def _request(self, make: Callable[[int], object], *, raise_now: bool = True) -> None:
        if not self._gone:
            seq = self.helper.next_seq()
            try:
                reply = self.helper.request(make(seq), seq)
                if reply.error is not None:
                    self._error = RecordingError(reply.error)
            except RecordingError as exc:
                self._gone, self._error = True, exc
        if raise_now:
            self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RecordingError(f"writing the trace to {self.path} failed: {error}")
