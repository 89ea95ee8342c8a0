"""A writer thread: the KV samples' writer, and the fallback for the trace writer process.

Encoding a 64-step batch of layer rows with zstd takes milliseconds, which would be several
percent of a step if done inline every 64 steps. The session queues plain Python rows and this
thread applies them (`batch_writer.BatchWriter`), copies sampled tensors to host bytes and writes
atomic parts through `TraceWriter`. Only this thread touches its writer. Its Python work competes
with `generate` for the GIL, which is why the trace itself is written by a process
(`writer_process.py`) where one can start.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kvscope.errors import RecordingError
from kvscope.recorder.batch_writer import BatchWriter
from kvscope.recorder.telemetry import NvmlSource
from kvscope.schema.tables import TABLES
from kvscope.trace.writer import TraceWriter

_STOP = object()


SAMPLE_FIELDS = ("run_id", "gen_id", "step", "layer", "tensor", "shape", "dtype", "data")


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
    data = pa.Table.from_pydict(dict(zip(SAMPLE_FIELDS, (list(c) for c in zip(*rows, strict=True)), strict=True)),
                                schema=table.arrow_schema())
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(data, tmp, compression="zstd", compression_level=1, use_dictionary=False)
    os.replace(tmp, directory / name)


class BackgroundWriter:
    """Owns a `TraceWriter` on its own thread; `flush(wait=True)` returns once parts are on disk."""

    def __init__(self, writer: TraceWriter, nvml: NvmlSource | None = None) -> None:
        self.writer = writer
        self._core = BatchWriter(writer, nvml)  # nvml: the source of each step's NVML reading
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvscope-writer", daemon=True)
        self._thread.start()

    def rows(self, table: str, names: Sequence[str], rows: list[tuple]) -> None:
        """Queue rows given as tuples in the order of `names`."""
        if rows:
            self._queue.put(("rows", table, tuple(names), rows))

    def step_batch(self, step_names: Sequence[str], step_rows: list[tuple], batch: list[tuple]) -> None:
        """Queue steps rows (kv_bytes, kv_logical_bytes and nvml_used_bytes left None) and the measured
        layers of those steps, `(run_id, gen_id, step, seq_len, measured)`: expanded together on this
        thread, NVML readings taken from the source given at construction."""
        if step_rows or batch:
            self._queue.put(("steps", tuple(step_names), step_rows, batch))

    def samples(self, rows: list[tuple], ready: Any = None) -> None:
        """Queue kv_samples rows whose last field is a host tensor (pinned, filled asynchronously) or a
        CPU clone; `ready` is the CUDA event recorded after the copies were enqueued (None on CPU)."""
        if rows:
            self._queue.put(("samples", rows, ready))

    def flush(self, *, wait: bool = False) -> None:
        done = threading.Event()
        self._queue.put(("flush", done))
        if wait:
            done.wait()
            self._raise_pending()

    def close(self, *, compact: bool = True) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self._raise_pending()
        self.writer.close(compact=compact)

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RecordingError(f"writing the trace to {self.writer.path} failed: {error}") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            try:
                self._handle(item)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller on the next flush/close
                self._error = exc
            finally:
                if item[0] == "flush":
                    item[1].set()

    def _handle(self, item: tuple) -> None:
        if item[0] == "samples":
            _, rows, ready = item
            if ready is not None:
                ready.synchronize()  # the asynchronous copies into pinned host memory are done
            write_samples_part(self.writer.path / "kv_samples", [(*row[:-1], tensor_bytes(row[-1])) for row in rows])
        else:
            self._core.handle(item)
