"""`RecordOptions`: every option of a recording, typed and validated once, for the API and the CLI.

`kvscope.record(model, path, **options)` and `kvscope record` build the same frozen object; the
run row's `options` JSON holds `to_run_options()` as is, plus what the recording found (whether
NVML answered, which writer and which measuring path ran).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvscope.errors import UsageError

MAX_FLUSH_EVERY = 64
# "process": parts are encoded and written by a child process (no GIL shared with generate);
# "thread": by a thread of this process; "auto": the process, else the thread with a warning.
WRITER_MODES = ("auto", "process", "thread")


@dataclass(frozen=True)
class RecordOptions:
    labels: Mapping[str, str] = field(default_factory=dict)
    sample_kv_every: int = 0  # 0 = off
    sample_layers: tuple[int, ...] | None = None  # None = all
    max_sample_bytes: int = 256 * 2**20
    flush_every: int = MAX_FLUSH_EVERY
    nvml: str | bool = "auto"  # "auto", True (required), False
    nvml_interval_ms: float = 1.0
    store_prompts: bool = False
    model_name: str | None = None
    tokenizer: str | None = None
    head_stats_every: int = 0  # 0 = off
    writer: str = "auto"
    native: str | bool = "auto"  # the C++ fast path: "auto" (a cached build), True (build now), False
    extra: Mapping[str, Any] = field(default_factory=dict)  # stored in run.options as given (the CLI's job)

    def __post_init__(self) -> None:
        if not 1 <= self.flush_every <= MAX_FLUSH_EVERY:
            raise UsageError(f"flush_every must be between 1 and {MAX_FLUSH_EVERY} steps, got {self.flush_every}.")
        if self.sample_kv_every < 0 or self.max_sample_bytes < 0 or self.head_stats_every < 0:
            raise UsageError("sample_kv_every, max_sample_bytes and head_stats_every must be >= 0.")
        if self.writer not in WRITER_MODES:
            raise UsageError(f"writer must be one of {', '.join(WRITER_MODES)}, got {self.writer!r}.")
        if not (self.native == "auto" or isinstance(self.native, bool)):
            raise UsageError(f"native must be 'auto', True or False, got {self.native!r}.")
        if not (self.nvml == "auto" or isinstance(self.nvml, bool)):
            raise UsageError(f"nvml must be 'auto', True or False, got {self.nvml!r}.")
        if not 0.1 <= self.nvml_interval_ms <= 1000:
            raise UsageError(f"nvml_interval_ms must be between 0.1 and 1000, got {self.nvml_interval_ms}.")
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})
        if self.sample_layers is not None:
            object.__setattr__(self, "sample_layers", tuple(sorted({int(i) for i in self.sample_layers})) or None)

    @classmethod
    def from_keywords(cls, options: RecordOptions | None = None, **keywords: Any) -> RecordOptions:
        """`record()`'s keywords (the old `options=` dict is `extra`), or a given object."""
        if options is not None and not isinstance(options, RecordOptions):
            keywords["extra"] = options
        elif options is not None:
            if keywords:
                raise UsageError("pass either a RecordOptions or keywords, not both.")
            return options
        names = {f.name for f in fields(cls)}
        unknown = set(keywords) - names
        if unknown:
            raise UsageError(f"unknown record option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}.")
        return cls(**keywords)

    def to_run_options(self) -> dict[str, Any]:
        """The options as the run row's `options` JSON holds them."""
        return {
            "sample_kv_every": self.sample_kv_every,
            "sample_layers": list(self.sample_layers) if self.sample_layers else "all",
            "max_sample_bytes": self.max_sample_bytes, "flush_every": self.flush_every,
            "nvml": self.nvml, "nvml_interval_ms": self.nvml_interval_ms, "store_prompts": self.store_prompts,
            "head_stats_every": self.head_stats_every, "writer_option": self.writer, "native_option": self.native,
            **self.extra,
        }
