"""KVScope: record, analyse and explain a transformer's KV cache.

    kvscope.record(model, "traces/run1")          # the recorder (a context manager; needs torch)
    kvscope.analyze("traces/run1", config={"post_eos": {"live_threshold": 0.6}})  # findings + verdict
    kvscope.sql("traces/", "SELECT run_id, max(kv_bytes) AS peak FROM steps GROUP BY run_id")  # Arrow table

Both are imported lazily: `import kvscope` pulls neither torch nor duckdb, and the analyser side
never pulls torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvscope._version import __version__
from kvscope.errors import KvscopeError

if TYPE_CHECKING:
    from kvscope.analyzer.api import Analysis, analyze, sql
    from kvscope.recorder import record

__all__ = ["Analysis", "KvscopeError", "__version__", "analyze", "record", "sql"]


def __getattr__(name: str) -> Any:
    if name == "record":
        from kvscope.recorder import record

        return record
    if name in ("analyze", "Analysis", "sql"):
        from kvscope.analyzer import api

        return getattr(api, name)
    raise AttributeError(f"module 'kvscope' has no attribute {name!r}")
