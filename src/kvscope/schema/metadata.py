"""`TraceMetadata`: the typed form of a `run` row."""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from kvscope._version import __version__
from kvscope.schema.tables import FORMAT_VERSION


def new_run_id() -> str:
    """A short random identifier, unique enough to union thousands of traces."""
    return uuid.uuid4().hex[:16]


@dataclass
class TraceMetadata:
    """Everything the `run` table says about one recording."""

    model_name: str
    model_type: str
    num_layers: int
    layer_types: list[str]
    dtype: str
    device: str = "cpu"
    model_config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "unknown"
    labels: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    host: str = field(default_factory=socket.gethostname)
    torch_version: str | None = None
    transformers_version: str | None = None
    gpu_name: str | None = None
    driver_version: str | None = None
    tokenizer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    nvml_total_bytes: int | None = None
    memory_limit_bytes: int | None = None
    job_id: str | None = None  # tensor parallel: one id for the job's ranks
    rank: int | None = None
    world_size: int | None = None
    format_version: str = FORMAT_VERSION
    kvscope_version: str = __version__

    def to_row(self) -> dict[str, Any]:
        """The `run` table row, JSON columns serialised."""
        row = asdict(self)
        row["model_config"] = json.dumps(self.model_config, sort_keys=True, default=str)
        row["labels"] = json.dumps(self.labels, sort_keys=True)
        row["options"] = json.dumps(self.options, sort_keys=True, default=str)
        row["layer_types"] = list(self.layer_types)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TraceMetadata:
        """Rebuild from a `run` row as read back (JSON columns parsed, unknown columns dropped)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in row.items() if k in known}
        for key in ("model_config", "labels", "options"):
            raw = values.get(key)
            values[key] = json.loads(raw) if isinstance(raw, str) and raw else {}
        return cls(**values)
