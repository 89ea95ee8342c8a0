"""Where rows are written: the messages the recording hands to its writer, and `BatchWriter`,
which turns them into Parquet parts. No torch.

Both writers run a `BatchWriter`: the writer process (`writer_process.py`, the default) and the
writer thread (`writer_thread.BackgroundWriter`). NVML, where it is read, is polled by a thread of the
writer (`nvml.NvmlPolling`) and fills each step's `nvml_used_bytes` and each generation's peak.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from kvscope.recorder.columns import HOOK_STEP_COLUMNS
from kvscope.recorder.layer_rows import expand_steps
from kvscope.recorder.nvml import NvmlPolling
from kvscope.trace.writer import TraceWriter


# The messages, in the order a block sends them. Frozen dataclasses: small, typed, picklable
# without torch (the writer process must never import it).
@dataclass(frozen=True)
class Open:  # start writing the trace at `path` (a writer process serves one block after another)
    path: str


@dataclass(frozen=True)
class Rows:  # rows of any table, as tuples in the order of `names`
    table: str
    names: tuple[str, ...]
    rows: list[tuple]


@dataclass(frozen=True)
class Steps:  # `steps` rows (columns.HOOK_STEP_COLUMNS) and their layers, (run_id, gen_id, step, seq_len, measured)
    rows: list[tuple]
    layers: list[tuple]


@dataclass(frozen=True)
class GenerationWindow:  # a generation started (`ended_ns` None) or ended: the window of its NVML peak
    gen_id: int
    started_ns: int
    ended_ns: int | None = None


@dataclass(frozen=True)
class Flush:  # write every buffered table as a new part
    pass


@dataclass(frozen=True)
class Sync:  # answer Reply(seq) once everything before it is handled, with the first error since the last
    seq: int


@dataclass(frozen=True)
class Close:  # flush, compact when asked, stop polling NVML, answer Reply(seq)
    seq: int
    compact: bool = True


@dataclass(frozen=True)
class NvmlConfig:  # where the writer's polling thread reads NVML: device UUIDs (or "fake"), every interval_s
    run_id: str
    devices: tuple[str, ...]
    origin_ns: int
    interval_s: float


class BatchWriter:
    """Applies messages to a `TraceWriter`; `nvml` fills steps' NVML readings (None: left null)."""

    def __init__(self, writer: TraceWriter, nvml: NvmlPolling | None = None) -> None:
        self.writer = writer
        self.nvml = nvml

    def handle(self, message: Any) -> None:
        kind = type(message)
        if kind is Steps:
            self.steps(message.rows, message.layers)
        elif kind is Rows:
            self.rows(message.table, message.names, message.rows)
        elif kind is GenerationWindow:
            if self.nvml is not None:
                if message.ended_ns is None:
                    self.nvml.begin(message.gen_id, message.started_ns)
                else:
                    self.nvml.end(message.gen_id, message.ended_ns)
        elif kind is Flush:
            self.writer.flush()
        elif kind is NvmlConfig:
            self.nvml = self._start_polling(message)
        else:
            raise ValueError(f"unknown writer message {message!r}")

    def rows(self, table: str, names: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        columns = dict(zip(names, (list(c) for c in zip(*rows, strict=True)), strict=True))
        if table == "generations" and self.nvml is not None:
            # The polled peak of each generation, with the boundary reads the recording took.
            columns["peak_nvml_used_bytes"] = [
                max_or_none(given, self.nvml.peak(gen_id))
                for gen_id, given in zip(columns["gen_id"], columns["peak_nvml_used_bytes"], strict=True)]
        self.writer.extend(table, columns)

    def steps(self, step_rows: list[tuple], batch: list[tuple]) -> None:
        tables, totals = expand_steps(batch)
        for table in tables:
            self.writer.extend_arrow("layers", table)
        if not step_rows:
            return
        columns = dict(zip(HOOK_STEP_COLUMNS, (list(c) for c in zip(*step_rows, strict=True)), strict=True))
        keys = list(zip(columns["gen_id"], columns["step"], strict=True))
        unique, logical = zip(*(totals.get(key, (0, 0)) for key in keys), strict=True)
        columns["kv_bytes"], columns["kv_logical_bytes"] = list(unique), list(logical)
        if self.nvml is not None:
            columns["nvml_used_bytes"] = self.nvml.take(columns["t_ns"])
        self.writer.extend("steps", columns)

    def _start_polling(self, config: NvmlConfig) -> NvmlPolling | None:
        """The polling thread, or None with an `error` event saying why (NVML readings are then null)."""
        try:
            return NvmlPolling(list(config.devices), config.origin_ns, config.interval_s)
        except Exception as exc:  # noqa: BLE001 - the trace goes on without polled readings
            detail = {"source": "nvml_polling", "exception": type(exc).__name__, "message": str(exc)[:2000]}
            self.writer.extend("events", {"run_id": [config.run_id], "gen_id": [None], "step": [None],
                                          "t_ns": [time.perf_counter_ns() - config.origin_ns], "kind": ["error"],
                                          "detail": [json.dumps(detail)]})
            return None

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()


def max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
