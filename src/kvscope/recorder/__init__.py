"""The recorder: hooks on a Hugging Face model's generate() that write KV-cache traces.

Where things happen, by file:
- a step's reading is taken in `step_hook.py` (the forward hook), from the cache (`measure.py`,
  `cache_walk.py`, `native/`) and the allocator (`allocator.py`); NVML in `nvml.py`;
- rows are made in `columns.py` (column orders, from the schema), `layer_rows.py` (layer rows and step
  totals, per batch) and `generation.py` (the generations row);
- rows are written by `batch_writer.py` (the messages and their handling), in the writer process
  (`writer_process.py`, `writer_child.py`) or thread (`writer_thread.py`);
- `session.py` is the `record` block and `options.py` its options (`kvscope record`'s generate loop is
  `kvscope.workload`).

Imports torch and pyarrow only (never polars or duckdb: GPU hosts lack them). `record` and
`Recording` are imported lazily, so the writer process can import the torch-free modules of this
package (`batch_writer`, `nvml`, `columns`, `facts`, `spans`, `layer_rows`, `writer_process`) without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recording", "record"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvscope.recorder import session

        return getattr(session, name)
    raise AttributeError(f"module 'kvscope.recorder' has no attribute {name!r}")
