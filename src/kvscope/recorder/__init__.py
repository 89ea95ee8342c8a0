"""The recorder: hooks on a Hugging Face model's generate() that write KV-cache traces.

Imports torch and pyarrow only (never polars or duckdb: GPU hosts lack them).
"""

from kvscope.recorder.session import Recording, record

__all__ = ["Recording", "record"]
