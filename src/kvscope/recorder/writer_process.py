"""The trace writer in its own process, so encoding a batch never takes the GIL from `generate`.

The writer used to be a thread. Its Python work per 64-step batch (about 1 ms) had to take the GIL
from the thread running `generate`, dozens of times per batch: each Arrow call releases the GIL and
taking it back forces a switch. Measured on the H100 host, the decode steps right after a flush
were 3–5 ms longer, about 1% of the run. A process shares no GIL: the hook's hand-over is now one
pickle and one pipe write (about 0.3 ms per batch), and the child expands the batch, reads NVML
from the same shared ring (`nvml_poller.NvmlPoller.attach`) and writes the parts
(`writer_child.py`). If the recording process dies, the child still writes every batch it
received. Errors come back at the next waited flush or at close, as `RecordingError`.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvscope.errors import RecordingError

if TYPE_CHECKING:
    from kvscope.recorder.nvml_poller import NvmlPoller

PIPE_BYTES = 1 << 20  # a 64-step batch of a 24-layer model pickles to about 80 KB


def _package_root() -> str:
    import kvscope

    return str(Path(kvscope.__file__).resolve().parents[1])


def child_pythonpath() -> str | None:
    """PYTHONPATH for the child: this kvscope's location first, unless it is a site-packages
    directory (the child finds that itself, and putting it on PYTHONPATH would let installed
    packages shadow the standard library)."""
    import site

    root = _package_root()
    current = os.environ.get("PYTHONPATH")
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in site_dirs:
        return current
    return os.pathsep.join(p for p in (root, current) if p)


class WriterProcess:
    """Same interface as `flusher.BackgroundWriter` for rows and steps (samples stay on a thread)."""

    description = "process"

    def __init__(self, path: str | os.PathLike[str], *, nvml: NvmlPoller | None = None, origin_ns: int = 0,
                 start_timeout_s: float = 60.0) -> None:
        """`nvml`: the recording's NVML poller; the child reads the same ring (its file descriptor is
        inherited) and matches readings to steps, so this process's poller keeps only the latest
        reading and the peaks, reading the ring forward at every hand-over."""
        self.path = Path(path)
        ring_fd = nvml.ring_fd if nvml is not None else None
        if nvml is not None and ring_fd is None:
            raise RecordingError("the NVML poller's ring is closed: the writer process cannot read it")
        self._nvml = nvml
        self._error: str | None = None
        self._failed = False  # an error was raised: a dead process is not reported twice
        self._seq = 0
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        pythonpath = child_pythonpath()
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        fds = (ring_fd,) if ring_fd is not None else ()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "kvscope.recorder.writer_child", str(self.path),
                 str(ring_fd if ring_fd is not None else -1), str(origin_ns)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, pass_fds=fds, env=env,
                bufsize=0)
        except (OSError, ValueError) as exc:  # no interpreter to run, or no fd passing on this platform
            self._stderr.close()
            raise RecordingError(f"the writer process did not start ({exc})") from exc
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        try:
            import fcntl

            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (ImportError, AttributeError, OSError):  # not Linux, or over the system's limit: the default works
            pass
        try:
            line = self._read_line(start_timeout_s)
        except (OSError, ValueError) as exc:  # select() on a pipe is POSIX-only
            line = f"error: {exc}"
        if line != "ready":
            self._kill()
            raise RecordingError(f"the writer process did not start ({line or self._stderr_tail() or 'no answer'})")
        if nvml is not None:
            nvml.keep_history = False  # the child matches readings to steps

    # -- the writer interface -------------------------------------------------------------------
    def rows(self, table: str, names: Sequence[str], rows: list[tuple]) -> None:
        if rows:
            self._send(("rows", table, tuple(names), rows))

    def step_batch(self, step_names: Sequence[str], step_rows: list[tuple], batch: list[tuple]) -> None:
        """Hand over steps and their measured layers; the child fills NVML readings from the ring."""
        if self._nvml is not None:
            self._nvml.refresh()  # so a long generation's peak sees every reading (the ring holds ~1 min)
        if step_rows or batch:
            self._send(("steps", tuple(step_names), step_rows, batch))

    def samples(self, rows: list[tuple], ready: Any = None) -> None:
        raise RecordingError("KV samples are written by the sample writer thread, not the writer process.")

    def flush(self, *, wait: bool = False) -> None:
        self._send(("flush",))
        if wait:
            self._seq += 1
            self._send(("sync", self._seq))
            self._await(self._seq)

    def close(self, *, compact: bool = True) -> None:
        if self._process.poll() is None and self._error is None:
            self._seq += 1
            self._send(("close", self._seq, compact))
            try:
                self._await(self._seq)
            finally:
                self._finish()
            return
        if self._error is None and not self._failed:  # it died quietly: what it had not written is lost
            self._error = (f"the writer process exited ({self._process.returncode}) before the trace was closed; "
                           f"{self._stderr_tail()}").strip()
        self._finish()
        self._raise_pending()

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, item: tuple) -> None:
        if self._error is not None:
            return  # reported at the next wait; nothing more reaches a dead writer
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._write_all(len(data).to_bytes(8, "little"))
            self._write_all(data)  # not joined to the header: a batch is ~200 KB, a copy costs
        except (BrokenPipeError, OSError, ValueError) as exc:
            self._error = f"the writer process is gone ({exc}); {self._stderr_tail()}".strip()

    def _write_all(self, data: bytes) -> None:
        # The pipe is unbuffered (bufsize=0): a write interrupted by a signal may write only part.
        view = memoryview(data)
        while view:
            written = self._stdin.write(view)
            view = view[written or 0:]

    def _await(self, seq: int) -> None:
        """Wait for the child's answer to sync/close `seq`; raise what went wrong since the last one."""
        while self._error is None:
            line = self._read_line(None)
            if not line:
                self._error = f"the writer process exited ({self._process.poll()}); {self._stderr_tail()}".strip()
                break
            kind, _, rest = line.partition(" ")
            number, _, message = rest.partition(" ")
            if int(number) != seq:
                continue
            if kind == "error":
                self._error = json.loads(message)
            break
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._failed = True
            raise RecordingError(f"writing the trace to {self.path} failed: {error}")

    def _read_line(self, timeout_s: float | None) -> str:
        if timeout_s is not None:
            readable, _, _ = select.select([self._stdout], [], [], timeout_s)
            if not readable:
                return ""
        return self._stdout.readline().decode(errors="replace").strip()

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

    def _finish(self) -> None:
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self._kill()
        self._stdout.close()
        self._stderr.close()

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        if not self._stderr.closed:
            self._stderr.close()
