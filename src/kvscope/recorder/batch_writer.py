"""Turns what the hook hands over into Parquet parts: the writer's work, without torch.

Both writers run this: the writer process (`writer_process.py`, the default) and the writer thread
(`flusher.BackgroundWriter`, the fallback). Items are tuples:

- ``("rows", table, names, rows)``: rows of any table, as tuples in the order of `names`;
- ``("steps", names, step_rows, batch)``: `steps` rows (kv_bytes, kv_logical_bytes and
  nvml_used_bytes still None) and the measured layers of those steps, expanded together;
- ``("flush",)``: write every buffered table as a new part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvscope.recorder.expand import expand_steps
from kvscope.trace.writer import TraceWriter


class StepReadings(Protocol):
    """Where NVML readings for steps come from (`NvmlPoller`, `NvmlSampler`)."""

    def take(self, keys: list[tuple[int, int]], times_ns: list[int]) -> list[int | None]: ...


class BatchWriter:
    """Applies items to a `TraceWriter`; `nvml` fills each step's NVML reading (None: left null)."""

    def __init__(self, writer: TraceWriter, nvml: StepReadings | None = None) -> None:
        self.writer = writer
        self.nvml = nvml

    def handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "rows":
            _, table, names, rows = item
            self.rows(table, names, rows)
        elif kind == "steps":
            _, names, step_rows, batch = item
            self.steps(names, step_rows, batch)
        elif kind == "flush":
            self.writer.flush()
        else:
            raise ValueError(f"unknown writer item {kind!r}")

    def rows(self, table: str, names: Sequence[str], rows: list[tuple]) -> None:
        columns = [list(c) for c in zip(*rows, strict=False)]
        self.writer.extend(table, dict(zip(names, columns, strict=False)))

    def steps(self, names: Sequence[str], step_rows: list[tuple], batch: list[tuple]) -> None:
        tables, totals = expand_steps(batch)
        for table in tables:
            self.writer.extend_arrow("layers", table)
        if not step_rows:
            return
        columns = dict(zip(names, (list(c) for c in zip(*step_rows, strict=True)), strict=True))
        keys = list(zip(columns["gen_id"], columns["step"], strict=True))
        unique, logical = zip(*(totals.get(key, (0, 0)) for key in keys), strict=True)
        columns["kv_bytes"], columns["kv_logical_bytes"] = list(unique), list(logical)
        if self.nvml is not None:
            columns["nvml_used_bytes"] = self.nvml.take(keys, columns["t_ns"])
        self.writer.extend("steps", columns)
