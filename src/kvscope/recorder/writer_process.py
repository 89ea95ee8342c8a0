"""The trace writer in its own process, so encoding a batch never takes the GIL from `generate`.

As a thread, the writer's Python work per 64-step batch (about 1 ms) took the GIL from `generate`
dozens of times per batch: the decode steps after a flush were 3–5 ms longer (H100 host), about 1%
of the run. Here the hand-over is one pickle and one pipe write (about 0.3 ms per batch) and the
child (`writer_child.py`, no torch) expands the batch, polls NVML on its own thread and writes the
parts. Messages are the frozen dataclasses of `batch_writer`, pickled with an 8-byte length.

Opening a block never waits for the child: what is sent before it is ready waits in the pipe (1 MiB),
so a block costs a fork and an exec, not the child's imports (3 s on the H200 host), and a block that
ends leaves its process to the next block of this process. If the recording process dies, the child
still writes every batch it received. Errors come back at the next waited flush or at close as
`RecordingError` (with the tail of the child's stderr); a hand-over never raises inside `generate`.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvscope.errors import RecordingError
from kvscope.recorder.batch_writer import Close, Flush, Open, Sync

PIPE_BYTES = 1 << 20  # a 64-step batch of a 24-layer model pickles to about 80 KB


@dataclass(frozen=True)
class Ready:
    """The child's first message: it has imported what it needs."""


@dataclass(frozen=True)
class Reply:
    """The child's answer to request `seq`: the first error since its last reply, if any."""

    seq: int
    error: str | None = None


def write_message(stream: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    for chunk in (len(data).to_bytes(8, "little"), data):  # not joined: a batch is ~200 KB, a copy costs
        view = memoryview(chunk)
        while view:  # an unbuffered pipe write interrupted by a signal may write only part
            view = view[stream.write(view) or 0:]


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: IO[bytes]) -> Any:
    """The next message, or None at end of input."""
    header = _read_exactly(stream, 8)
    payload = _read_exactly(stream, int.from_bytes(header, "little")) if header is not None else None
    return pickle.loads(payload) if payload is not None else None


def child_pythonpath() -> str | None:
    """PYTHONPATH for a child: this kvscope's location first, unless it is a site-packages directory
    (the child finds that itself, and on PYTHONPATH it would let packages shadow the standard library)."""
    import site

    import kvscope

    root = str(Path(kvscope.__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH")
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in site_dirs:
        return current
    return os.pathsep.join(p for p in (root, current) if p)


class ChildProcess:
    """A running `python -m kvscope.recorder.writer_child`; `RecordingError` when it cannot start."""

    def __init__(self) -> None:
        self.ready = False
        self.seq = 0
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        pythonpath = child_pythonpath()
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "kvscope.recorder.writer_child"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                            env=env, bufsize=0)
        except (OSError, ValueError) as exc:  # no interpreter to run
            self._stderr.close()
            raise RecordingError(f"the writer process did not start ({exc})") from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin, self._stdout = self.process.stdin, self.process.stdout
        try:
            import fcntl

            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (ImportError, AttributeError, OSError):  # not Linux, or over the system's limit: the default works
            pass

    def send(self, message: object) -> None:
        try:
            write_message(self._stdin, message)
        except (OSError, ValueError) as exc:
            raise self.failure(f"is gone ({exc})") from None

    def request(self, make: Callable[[int], object]) -> Reply:
        """Send `make(seq)`, which the child answers with `Reply(seq)`, and wait for that reply."""
        self.seq += 1
        self.send(make(self.seq))
        while True:
            reply = self._receive()
            if isinstance(reply, Reply) and reply.seq == self.seq:
                return reply

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        while not self.ready:
            if timeout_s is not None and not select.select([self._stdout], [], [], timeout_s)[0]:
                return False
            self._receive()
        return True

    def _receive(self) -> Any:
        message = read_message(self._stdout)
        if message is None:
            raise self.failure(f"exited ({self.process.wait()})")
        self.ready = self.ready or isinstance(message, Ready)
        return message

    def failure(self, what: str) -> RecordingError:
        try:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            tail = ""
        return RecordingError(f"the writer process {what}; {tail}".strip().rstrip(";"))

    def stop(self, timeout_s: float = 600) -> None:
        """Close its input (the child finishes what it was sent) and wait; kill it past the timeout."""
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stdout.close()
        self._stderr.close()


_idle: list[ChildProcess] = []  # a writer process between two blocks, for the next one
_idle_lock = threading.Lock()


def _take_child() -> ChildProcess:
    """The idle writer process if one is alive (another block may be using none), else a new one."""
    with _idle_lock:
        while _idle:
            child = _idle.pop()
            if child.process.poll() is None:
                return child
            child.stop(timeout_s=0)
    return ChildProcess()


@atexit.register
def stop_idle_writers() -> None:
    """End the idle writer process (it would also end on its own when this process's pipe closes)."""
    with _idle_lock:
        children, _idle[:] = list(_idle), []
    for child in children:
        child.stop(timeout_s=5)


class WriterProcess:
    """One block's writer, same interface as `writer_thread.BackgroundWriter`: `send`, `flush`, `close`."""

    kind = "process"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.helper = _take_child()
        self._error: RecordingError | None = None  # raised at the next wait
        self._gone = False  # the process is gone: later messages are dropped, its end reported once
        self.send(Open(self.path))

    @property
    def pids(self) -> list[int]:
        return [self.helper.process.pid]

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
            with _idle_lock:
                keep = not self._gone and self.helper.process.poll() is None and not _idle
                if keep:
                    _idle.append(self.helper)
            if not keep:  # gone, or one idle process is enough
                self.helper.stop()
        self._raise_pending()

    def discard(self) -> None:
        """End the process without finishing the trace (a block that failed to start)."""
        self._gone = True
        self.helper.stop()

    def _request(self, make: Callable[[int], object], *, raise_now: bool = True) -> None:
        if not self._gone:
            try:
                reply = self.helper.request(make)
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
