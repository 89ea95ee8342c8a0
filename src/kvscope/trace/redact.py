"""`kvscope redact TRACE -o OUT`: a copy of a trace that is safe to hand to another team.

What a default trace holds about where it was made: the host name (`run.host`), absolute local
paths (a model directory in `run.model_name`, the prompts file and output folder in
`run.options`, paths inside exception messages in `events.detail`), the user's labels
(`run.labels`) and the prompt ids of the prompts file (`generations.prompt_id`). It holds no
prompt text, token ids or tensors unless the recording opted in (`store_prompts` fills
`generations.prompt_text`; sampling fills `kv_samples`).

The copy: host replaced by "redacted"; every absolute path in every string (JSON included) cut to
`<path>/<last part>`; the labels given removed (or all of them); prompt ids replaced by a salted
hash (equal ids stay equal, so per-prompt comparisons still work); prompt text removed;
`kv_samples` left out unless asked. Numbers, shapes and dtypes are kept, so every detector gives
the same findings. The original is not touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import UsageError
from kvscope.schema.tables import META_REPLACES, TABLES
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace, shown
from kvscope.trace.writer import write_part

META_REDACTED = b"kvscope.redacted"
# An absolute POSIX path (two parts at least) or a Windows drive path, up to a quote, space or separator.
_PATH = re.compile(r"(?<![\w.:/~])(?:/(?:[^\s\"'`,;:<>|()\[\]{}/]+/)+[^\s\"'`,;:<>|()\[\]{}/]*"
                   r"|[A-Za-z]:\\(?:[^\s\"'`,;<>|\\]+\\)*[^\s\"'`,;<>|\\]*)")
_HOME = re.compile(r"~/[^\s\"'`,;<>|]+")


def redact_paths(text: str) -> str:
    """Every absolute path (and ~/...) in `text` as `<path>/<last part>`."""
    def last(match: re.Match[str]) -> str:
        parts = [p for p in re.split(r"[/\\]", match.group(0)) if p]
        return "<path>/" + parts[-1] if parts else "<path>"

    return _HOME.sub(last, _PATH.sub(last, text))


class _Redactor:
    def __init__(self, labels: Iterable[str], all_labels: bool, keep_host: bool, keep_paths: bool,
                 keep_prompt_ids: bool) -> None:
        self.labels = set(labels)
        self.all_labels = all_labels
        self.keep_host = keep_host
        self.keep_paths = keep_paths
        self.keep_prompt_ids = keep_prompt_ids
        self.salt = secrets.token_bytes(16)

    def text(self, value: str) -> str:
        return value if self.keep_paths else redact_paths(value)

    def json_text(self, value: str) -> str:
        try:
            loaded = json.loads(value)
        except ValueError:
            return self.text(value)
        return json.dumps(self._walk(loaded), sort_keys=True)

    def _walk(self, obj: Any) -> Any:
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, list):
            return [self._walk(v) for v in obj]
        if isinstance(obj, dict):
            return {self.text(str(k)): self._walk(v) for k, v in obj.items()}
        return obj

    def labels_json(self, value: str) -> str:
        try:
            loaded = json.loads(value)
        except ValueError:
            return "{}"
        if not isinstance(loaded, dict) or self.all_labels:
            return "{}"
        return json.dumps(self._walk({k: v for k, v in loaded.items() if k not in self.labels}), sort_keys=True)

    def prompt_id(self, value: str) -> str:
        if self.keep_prompt_ids:
            return self.text(value)
        return "prompt-" + hashlib.sha256(self.salt + value.encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def column(self, table: str, name: str, array: pa.ChunkedArray) -> pa.ChunkedArray:
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            return array
        values = array.to_pylist()
        if table == "run" and name == "host" and not self.keep_host:
            out = ["redacted" if v is not None else None for v in values]
        elif table == "run" and name == "labels":
            out = [self.labels_json(v) if v is not None else None for v in values]
        elif table == "generations" and name == "prompt_id":
            out = [self.prompt_id(v) if v is not None else None for v in values]
        elif table == "generations" and name == "prompt_text":
            out = [None] * len(values)
        elif name in ("model_config", "options", "detail"):
            out = [self.json_text(v) if v is not None else None for v in values]
        elif name in ("run_id",):
            out = values
        else:
            out = [self.text(v) if v is not None else None for v in values]
        return pa.chunked_array([pa.array(out, array.type)])


def redact_trace(source: str | os.PathLike[str], output: str | os.PathLike[str], *, labels: Iterable[str] = (),
                 all_labels: bool = False, keep_host: bool = False, keep_paths: bool = False,
                 keep_prompt_ids: bool = False, keep_samples: bool = False) -> Path:
    """Write a redacted copy of the trace `source` to the new folder `output`; return `output`."""
    trace = open_trace(source)
    report = check_invariants(trace)
    if not report.ok:
        raise UsageError(f"{shown(trace.path)}: the trace is invalid ({report.errors[0]}); redact a valid trace.")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{shown(out)}: the output must be a new or empty folder.")
    if out.resolve() == trace.path.resolve() or trace.path.resolve() in out.resolve().parents:
        raise UsageError(f"{shown(out)}: the output must be outside the trace.")
    redactor = _Redactor(labels, all_labels, keep_host, keep_paths, keep_prompt_ids)
    out.mkdir(parents=True, exist_ok=True)
    for table, parts in trace.parts.items():
        if table == "kv_samples" and not keep_samples:
            continue
        spec = TABLES[table]
        for part in parts:
            data = pq.read_table(part.path, page_checksum_verification=True)
            metadata = {k: v for k, v in (data.schema.metadata or {}).items() if k != META_REPLACES}
            metadata[META_REDACTED] = b"1"
            for i, name in enumerate(data.column_names):
                data = data.set_column(i, data.schema.field(i), redactor.column(table, name, data[name]))
            write_part(out / table, spec, data.replace_schema_metadata(metadata))
    return out
