"""The KVScope trace format: tables, columns, version. Needs only pyarrow."""

from kvscope.schema.metadata import TraceMetadata, new_run_id
from kvscope.schema.tables import (
    DEVICE_STEPS,
    EVENTS,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    FORMAT_VERSION,
    GENERATIONS,
    HEAD_STATS,
    KV_SAMPLES,
    LAYER_DEVICES,
    LAYERS,
    META_FORMAT,
    META_REPLACES,
    META_TABLE,
    RUN,
    STEPS,
    TABLES,
    Column,
    Table,
)

__all__ = [
    "DEVICE_STEPS", "EVENTS", "FORMAT_MAJOR", "FORMAT_MINOR", "FORMAT_VERSION", "GENERATIONS", "HEAD_STATS",
    "KV_SAMPLES", "LAYER_DEVICES", "LAYERS", "META_FORMAT", "META_REPLACES", "META_TABLE", "RUN", "STEPS", "TABLES",
    "Column", "Table", "TraceMetadata", "new_run_id",
]
