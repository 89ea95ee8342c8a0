"""KVScope: record, analyse and explain a transformer's KV cache.

`kvscope.record` (the recorder) is imported lazily so that the analyser side never pulls torch.
"""

from __future__ import annotations

from typing import Any

from kvscope._version import __version__
from kvscope.errors import KvscopeError

__all__ = ["KvscopeError", "__version__", "record"]


def __getattr__(name: str) -> Any:
    if name == "record":
        from kvscope.recorder import record

        return record
    raise AttributeError(f"module 'kvscope' has no attribute {name!r}")
