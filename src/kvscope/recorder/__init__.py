"""The recorder: hooks on a Hugging Face model's generate() that write KV-cache traces.

Imports torch and pyarrow only (never polars or duckdb: GPU hosts lack them). `record` and
`Recording` are imported lazily, so the writer process can import the torch-free modules of this
package (`facts`, `spans`, `expand`, `batch_writer`) without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Recording", "record"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvscope.recorder import session

        return getattr(session, name)
    raise AttributeError(f"module 'kvscope.recorder' has no attribute {name!r}")
