"""A writer thread: the hot path hands over row batches; Parquet encoding happens off it.

Encoding a 64-step batch of layer rows with zstd takes milliseconds, which would be several
percent of a step if done inline every 64 steps. The session queues plain Python rows (tuples per
layer) and this thread expands them into columns, copies sampled tensors to host bytes and
writes atomic parts through `TraceWriter`. Only this thread touches the writer.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from kvscope.errors import RecordingError
from kvscope.trace.writer import TraceWriter

_STOP = object()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous host copy of `tensor`."""
    if sys.byteorder != "little":
        raise RecordingError("KV samples are stored little-endian; this host is big-endian.")
    host = tensor.detach().to("cpu").contiguous()
    return host.view(torch.uint8).numpy().tobytes() if host.numel() else b""


class BackgroundWriter:
    """Owns a `TraceWriter` on its own thread; `flush(wait=True)` returns once parts are on disk."""

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvscope-writer", daemon=True)
        self._thread.start()

    def rows(self, table: str, names: Sequence[str], rows: list[tuple]) -> None:
        """Queue rows given as tuples in the order of `names`."""
        if rows:
            self._queue.put(("rows", table, tuple(names), rows))

    def samples(self, rows: list[tuple]) -> None:
        """Queue kv_samples rows whose last field is a tensor still to be copied to host bytes."""
        if rows:
            self._queue.put(("samples", rows))

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
        kind = item[0]
        if kind == "rows":
            _, table, names, rows = item
            columns = [list(c) for c in zip(*rows, strict=False)]
            self.writer.extend(table, dict(zip(names, columns, strict=False)))
        elif kind == "samples":
            names = ("run_id", "gen_id", "step", "layer", "tensor", "shape", "dtype", "data")
            rows = [(*row[:-1], tensor_bytes(row[-1])) for row in item[1]]
            self.writer.extend("kv_samples", dict(zip(names, (list(c) for c in zip(*rows, strict=False)), strict=False)))
        elif kind == "flush":
            self.writer.flush()
