"""The one child-process helper: spawn `python -m MODULE`, send typed messages, request/reply, stop.

Messages are small frozen dataclasses (see `batch_writer`), pickled and framed with an 8-byte
little-endian length, in both directions. Spawning does not wait for the child: what is sent
before it is ready waits in the pipe (1 MiB), so opening a record block costs a fork and an exec,
not the child's imports (3 s on the H200 host). The child's stderr goes to a temporary file whose
tail is quoted when the child fails. Imports no torch (the writer child imports this module).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvscope.errors import RecordingError

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
            written = stream.write(view)
            view = view[written or 0:]


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
    """PYTHONPATH for the child: this kvscope's location first, unless it is a site-packages
    directory (the child finds that itself, and putting it on PYTHONPATH would let installed
    packages shadow the standard library)."""
    import site

    import kvscope

    root = str(Path(kvscope.__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH")
    site_dirs = {str(Path(d).resolve()) for d in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in site_dirs:
        return current
    return os.pathsep.join(p for p in (root, current) if p)


class HelperProcess:
    """A running `python -m module args...`; raises `RecordingError` when it cannot be started."""

    def __init__(self, module: str, args: Sequence[str], *, name: str) -> None:
        self.name = name
        self.ready = False
        self._seq = 0
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        pythonpath = child_pythonpath()
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        try:
            self.process = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=self._stderr, env=env, bufsize=0)
        except (OSError, ValueError) as exc:  # no interpreter to run
            self._stderr.close()
            raise RecordingError(f"the {name} process did not start ({exc})") from exc
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin, self._stdout = self.process.stdin, self.process.stdout
        try:
            import fcntl

            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (ImportError, AttributeError, OSError):  # not Linux, or over the system's limit: the default works
            pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: object) -> None:
        """Queue a message in the pipe; `RecordingError` if the child is gone."""
        try:
            write_message(self._stdin, message)
        except (OSError, ValueError) as exc:
            raise self.failure(f"is gone ({exc})") from None

    def request(self, message: object, seq: int) -> Reply:
        """Send a message that the child answers with `Reply(seq)`, and wait for that reply."""
        self.send(message)
        while True:
            reply = self._receive()
            if isinstance(reply, Reply) and reply.seq == seq:
                return reply

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the child said it is ready within `timeout_s` (None: wait as long as it takes)."""
        while not self.ready:
            if timeout_s is not None and not select.select([self._stdout], [], [], timeout_s)[0]:
                return False
            self._receive()
        return True

    def _receive(self) -> Any:
        message = read_message(self._stdout)
        if message is None:
            raise self.failure(f"exited ({self.process.wait()})")
        if isinstance(message, Ready):
            self.ready = True
        return message

    def failure(self, what: str) -> RecordingError:
        return RecordingError(f"the {self.name} process {what}; {self.stderr_tail()}".strip().rstrip(";"))

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

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


class ChildChannel:
    """The child's side: messages from stdin, replies on the real stdout (stray prints go to stderr)."""

    def __init__(self) -> None:
        # Ctrl-C reaches the whole process group: the parent decides when this process stops.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._in = sys.stdin.buffer
        self._out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)

    def receive(self) -> Any:
        return read_message(self._in)

    def reply(self, message: object) -> None:
        try:
            write_message(self._out, message)
        except OSError:  # the parent is gone; keep writing what it sent until end of input
            pass
