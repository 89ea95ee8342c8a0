"""A writer thread: the KV samples' writer, and the trace writer when no process can start.

The session queues `batch_writer` messages and this thread applies them (`BatchWriter`), copies
sampled tensors to host bytes and writes atomic parts through `TraceWriter`. Only this thread
touches its writer. Its Python work competes with `generate` for the GIL (and so does its NVML
polling thread), which is why the trace itself is written by a process (`writer_process.py`)
where one can start.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kvscope.errors import RecordingError
from kvscope.recorder.batch_writer import BatchWriter, Flush
from kvscope.recorder.columns import SAMPLE_COLUMNS
from kvscope.schema.tables import TABLES
from kvscope.trace.writer import TraceWriter

_STOP = object()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous host copy of `tensor`."""
    if sys.byteorder != "little":
        raise RecordingError("KV samples are stored little-endian; this host is big-endian.")
    host = tensor.detach().to("cpu").contiguous()
    return host.view(torch.uint8).numpy().tobytes() if host.numel() else b""


def write_samples_part(directory: Path, rows: list[tuple]) -> None:
    """Write kv_samples rows as one atomic part: light zstd, no dictionaries (raw floats barely compress,
    and level-9 zstd over hundreds of MiB would take seconds)."""
    table = TABLES["kv_samples"]
    data = pa.Table.from_pydict(dict(zip(SAMPLE_COLUMNS, (list(c) for c in zip(*rows, strict=True)), strict=True)),
                                schema=table.arrow_schema())
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(data, tmp, compression="zstd", compression_level=1, use_dictionary=False)
    os.replace(tmp, directory / name)


class Samples:
    """kv_samples rows whose last field is a host tensor (pinned, filled asynchronously) or a CPU
    clone; `ready` is the CUDA event recorded after the copies were enqueued (None on CPU)."""

    def __init__(self, rows: list[tuple], ready: Any = None) -> None:
        self.rows, self.ready = rows, ready


class BackgroundWriter:
    """Owns a `TraceWriter` on its own thread; `flush(wait=True)` returns once parts are on disk."""

    kind = "thread"
    pids: list[int] = []

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self._core = BatchWriter(writer)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvscope-writer", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        self._queue.put(message)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        return True

    def flush(self, *, wait: bool = False) -> None:
        done = threading.Event()
        self._queue.put((Flush(), done))
        if wait:
            done.wait()
            self._raise_pending()

    def close(self, *, compact: bool = True) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._core.close()
        self._raise_pending()
        self.writer.close(compact=compact)

    def discard(self) -> None:
        try:
            self.close(compact=False)
        except Exception:  # noqa: BLE001 - a block that failed to start reports that failure
            pass

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RecordingError(f"writing the trace to {self.writer.path} failed: {error}") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            done = None
            if isinstance(item, tuple):
                item, done = item
            try:
                if isinstance(item, Samples):
                    if item.ready is not None:
                        item.ready.synchronize()  # the asynchronous copies into pinned host memory are done
                    write_samples_part(self.writer.path / "kv_samples",
                                       [(*row[:-1], tensor_bytes(row[-1])) for row in item.rows])
                else:
                    self._core.handle(item)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller on the next flush/close
                self._error = exc
            finally:
                if done is not None:
                    done.set()
