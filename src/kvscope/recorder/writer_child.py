"""The writer process (started by `writer_process.WriterProcess`; imports no torch).

    python -m kvscope.recorder.writer_child

Reads `batch_writer` messages from stdin and writes Parquet parts with a `BatchWriter`: `Open(path)`
starts a trace, `Close` ends it, and the process waits for the next block's `Open`. Says `Ready` once
imported; answers each `Sync` and `Close` with a `Reply` carrying the first error since the last
reply. At end of input (the recording process ended or died) it writes what it received, without
compacting, and exits: a crash loses only what was never handed over.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

from kvscope.recorder.batch_writer import BatchWriter, Close, Open, Sync
from kvscope.recorder.writer_process import Ready, Reply, read_message, write_message
from kvscope.trace.writer import TraceWriter


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the parent decides
    source = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb", buffering=0)  # replies on the real stdout; stray prints go to stderr
    os.dup2(2, 1)

    def reply(message: object) -> None:
        try:
            write_message(out, message)
        except OSError:  # the parent is gone; keep writing what it sent until end of input
            pass

    reply(Ready())
    core: BatchWriter | None = None
    error: str | None = None
    while True:
        message = read_message(source)
        if message is None:  # the recording process is gone: keep what it handed over
            if core is not None:
                try:
                    core.writer.flush()
                except Exception:  # noqa: BLE001 - nobody is left to tell
                    pass
                core.close()
            return 0
        try:
            if isinstance(message, Sync):
                reply(Reply(message.seq, error))
                error = None
            elif isinstance(message, Open):
                core = BatchWriter(TraceWriter(message.path))
            elif isinstance(message, Close):
                if core is not None:
                    trace, core = core, None
                    trace.close()
                    trace.writer.close(compact=message.compact)
                reply(Reply(message.seq, error))
                error = None
            elif core is None:
                raise RuntimeError(f"{type(message).__name__} before any Open")
            else:
                core.handle(message)
        except Exception as exc:  # noqa: BLE001 - reported at the next reply; later messages still run
            if error is None:
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            if isinstance(message, Close):
                reply(Reply(message.seq, error))
                error = None


if __name__ == "__main__":
    raise SystemExit(main())
