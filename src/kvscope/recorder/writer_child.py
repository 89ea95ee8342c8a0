"""The writer process (started by `writer_process.WriterProcess`; imports no torch).

    python -m kvscope.recorder.writer_child TRACE_DIR RING_FD ORIGIN_NS

Reads framed items from stdin (8-byte little-endian length, then a pickle of a `batch_writer`
item, or of ``("sync", seq)`` / ``("close", seq, compact)``) and writes Parquet parts with a
`BatchWriter`. Step rows get NVML readings from the NVML ring inherited as RING_FD (-1: none).
Prints "ready" once started; answers each sync with ``ok SEQ`` or ``error SEQ MESSAGE`` (the
first error since the last answer, as one JSON string), and close likewise, after writing and
compacting. On end of input without a close (the recording process died), it writes what it has
received, without compacting, and exits: a crash loses only what was never handed over.
"""

from __future__ import annotations

import json
import pickle
import signal
import sys
import traceback

from kvscope.recorder.batch_writer import BatchWriter
from kvscope.trace.writer import TraceWriter


def _read_exactly(stream: object, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)  # type: ignore[attr-defined]
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the recording process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trace_dir, ring_fd, origin_ns = argv[0], int(argv[1]), int(argv[2])
    nvml = None
    if ring_fd >= 0:
        from kvscope.recorder.nvml_poller import NvmlPoller

        nvml = NvmlPoller.attach(ring_fd, origin_ns)
    writer = TraceWriter(trace_dir)
    core = BatchWriter(writer, nvml)
    stdin = sys.stdin.buffer
    error: str | None = None
    print("ready", flush=True)

    def answer(seq: int) -> None:
        nonlocal error
        try:
            print(f"ok {seq}" if error is None else f"error {seq} {json.dumps(error)}", flush=True)
        except OSError:  # the recording process is gone; keep writing what it sent until end of input
            pass
        error = None

    while True:
        header = _read_exactly(stdin, 8)
        payload = _read_exactly(stdin, int.from_bytes(header, "little")) if header is not None else None
        if payload is None:  # the recording process is gone: keep what it handed over
            try:
                writer.flush()
            except Exception:  # noqa: BLE001 - nobody is left to tell
                pass
            return 0
        item = pickle.loads(payload)
        kind = item[0]
        try:
            if kind == "sync":
                answer(item[1])
                continue
            if kind == "close":
                writer.close(compact=item[2])
                answer(item[1])
                return 0
            core.handle(item)
        except Exception as exc:  # noqa: BLE001 - reported at the next sync; later items still run
            if error is None:
                error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            if kind == "close":
                answer(item[1])
                return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
