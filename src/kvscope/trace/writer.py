"""Append rows to a trace and flush them as Parquet part files, atomically.

A part is written as `.<name>.tmp` and renamed into place, so readers (and `read_parquet` globs)
never see a half-written file and a process killed at any instant leaves every finished part
readable. `compact()` merges a table's parts into one sorted part (`compact_parts`): the merged
part is written under a temporary name, a journal names it and the parts it replaces, the old
parts are moved aside (to names no `*.parquet` glob matches), and only then does the merged part
get its name. A crash at any point leaves every reader (kvscope, DuckDB over the glob,
`pyarrow.dataset`) seeing the same parts, and `repair_compaction` (run by `kvscope compact`)
finishes or undoes what the journal describes. Pages carry CRC checksums.
Needs only pyarrow: the recorder runs on GPU hosts without polars or duckdb.
"""

from __future__ import annotations

import fnmatch
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import TraceError
from kvscope.schema.tables import META_FORMAT, META_REPLACES, TABLES, Table
from kvscope.trace.text import clean

PART_GLOB = "part-*.parquet"
TMP_SUFFIX = ".tmp"  # `.part-<id>.parquet.tmp`: being written
ASIDE_SUFFIX = ".aside"  # `.part-<id>.parquet.aside`: replaced by a compaction that has not finished
JOURNAL_NAME = ".compact.json"  # what an unfinished compaction merged and set aside
COMPACT_GROUP = 512  # parts read before they are combined into one chunk while compacting
ZSTD_LEVEL = 9
# Sampled tensors barely compress and can be large: merging them would only cost memory.
NOT_COMPACTED = frozenset({"kv_samples"})


def write_options(table: Table, schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options: zstd, delta encoding for monotonic integers, dictionaries elsewhere."""
    delta = [c.name for c in table.columns if c.encoding == "delta" and c.name in schema.names]
    dictionary = [n for n in schema.names if n not in delta]
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": dictionary,
        "column_encoding": {n: "DELTA_BINARY_PACKED" for n in delta},
        "write_statistics": True,
        "write_page_checksum": True,
    }


def _write_tmp(directory: Path, table: Table, data: pa.Table, replaces: Sequence[str] = ()) -> tuple[Path, str]:
    """Write `data` as `.<name>.tmp` in `directory`; return the temporary path and the final name."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    metadata = dict(table.arrow_schema().metadata)
    metadata.update(data.schema.metadata or {})
    if replaces:
        metadata[META_REPLACES] = ",".join(replaces).encode()
    data = data.replace_schema_metadata(metadata)
    tmp = directory / f".{name}{TMP_SUFFIX}"
    pq.write_table(data, tmp, **write_options(table, data.schema))
    return tmp, name


def write_part(directory: Path, table: Table, data: pa.Table, *, replaces: Sequence[str] = ()) -> Path:
    """Write one part file atomically (temporary name, then rename) and return its path."""
    tmp, name = _write_tmp(directory, table, data, replaces)
    os.replace(tmp, directory / name)
    return directory / name


def _version_key(raw: bytes) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in raw.decode().split("."))
    except ValueError:
        return (0,)


def _checkpoint(stage: str) -> None:
    """A named point of `compact_parts` (tests replace this to crash there)."""


def _aside(name: str) -> str:
    return f".{name}{ASIDE_SUFFIX}"


def _write_journal(directory: Path, journal: dict[str, Any]) -> None:
    tmp = directory / f"{JOURNAL_NAME}{TMP_SUFFIX}"
    tmp.write_text(json.dumps(journal), encoding="utf-8")
    os.replace(tmp, directory / JOURNAL_NAME)


def _merge(directory: Path, table: Table, names: Sequence[str]) -> tuple[pa.Table, list[bytes]]:
    """The parts `names` as one table (sorted by the table's keys) and the format versions they claim."""
    # read in groups, each combined into one chunk: 100,000 one-row tables would cost ~30 KB each
    versions: list[bytes] = []
    merged_groups: list[pa.Table] = []
    group: list[pa.Table] = []
    for n in names:
        try:
            piece = pq.ParquetFile(directory / n).read()  # not read_table: about 2x faster per file
        except OSError as exc:
            raise TraceError(f"{clean(directory / n, 400)}: part cannot be read, so it is not compacted "
                             f"({clean(exc, 300)}).") from exc
        versions.append((piece.schema.metadata or {}).get(META_FORMAT, b""))
        group.append(piece.replace_schema_metadata(None))
        if len(group) >= COMPACT_GROUP:
            merged_groups.append(pa.concat_tables(group, promote_options="permissive").combine_chunks())
            group = []
    if group:
        merged_groups.append(pa.concat_tables(group, promote_options="permissive").combine_chunks())
    data = pa.concat_tables(merged_groups, promote_options="permissive")
    if table.sort_keys and all(k in data.column_names for k in table.sort_keys):
        data = data.sort_by([(k, "ascending") for k in table.sort_keys])
    return data, versions


def compact_parts(directory: Path, table: Table, names: Sequence[str], *, drop: Sequence[str] = ()) -> Path:
    """Merge the parts `names` of one table folder into one sorted part; `drop` are set aside unread.

    Order: merged part written as `.tmp`, journal, old parts moved aside (no glob matches them),
    merged part renamed into place, aside files and journal removed. Between any two steps every
    reader lists the same parts; `repair_compaction` completes or undoes an interrupted run.
    """
    try:
        data, versions = _merge(directory, table, names)
    except (pa.ArrowException, ValueError) as exc:  # parts whose columns cannot be unified or sorted
        raise TraceError(f"{clean(directory, 400)}: the parts of table '{table.name}' cannot be merged "
                         f"({clean(exc, 300)}).") from exc
    newest = max(versions, key=_version_key)
    if _version_key(newest) > _version_key(table.arrow_schema().metadata[META_FORMAT]):
        data = data.replace_schema_metadata({META_FORMAT: newest})  # keep a newer minor version's claim
    tmp, merged = _write_tmp(directory, table, data, replaces=list(names))
    _checkpoint("merged-written")
    replaced = [*names, *drop]
    _write_journal(directory, {"merged": merged, "tmp": tmp.name, "replaces": replaced})
    _checkpoint("journal-written")
    for i, name in enumerate(replaced):
        os.replace(directory / name, directory / _aside(name))
        if i == 0:
            _checkpoint("first-aside")
    _checkpoint("all-aside")
    os.replace(tmp, directory / merged)
    _checkpoint("merged-renamed")
    for name in replaced:
        (directory / _aside(name)).unlink(missing_ok=True)
    _checkpoint("aside-deleted")
    (directory / JOURNAL_NAME).unlink(missing_ok=True)
    return directory / merged


def repair_compaction(directory: Path) -> str | None:
    """Finish (merged part in place) or undo (not yet) an interrupted `compact_parts`; say which."""
    journal_path = directory / JOURNAL_NAME
    asides = sorted(p for p in directory.glob(f".part-*.parquet{ASIDE_SUFFIX}"))
    if not journal_path.exists():
        for aside in asides:  # set aside without a journal: cannot be a finished merge, so restore
            os.replace(aside, directory / aside.name[1:-len(ASIDE_SUFFIX)])
        return f"restored {len(asides)} part(s) set aside" if asides else None
    try:
        journal = json.loads(journal_path.read_text(encoding="utf-8"))
        merged, tmp, replaced = str(journal["merged"]), str(journal["tmp"]), [str(n) for n in journal["replaces"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{directory / JOURNAL_NAME}: unreadable compaction journal ({exc}); "
                         "look at the folder before removing it.") from exc
    for name in (merged, tmp, *replaced):
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise TraceError(f"{directory / JOURNAL_NAME}: the journal names a file outside its folder.")
    # a journal is trace data too: it may only name parts, and a temporary file to delete
    if not (fnmatch.fnmatchcase(merged, PART_GLOB) and all(fnmatch.fnmatchcase(n, PART_GLOB) for n in replaced)
            and tmp.startswith(".") and tmp.endswith(TMP_SUFFIX)):
        raise TraceError(f"{directory / JOURNAL_NAME}: the compaction journal names files that are not parts "
                         "and temporary parts; look at the folder before removing it.")
    if (directory / merged).exists():  # the merged part is live: drop what it replaced
        for name in replaced:
            (directory / _aside(name)).unlink(missing_ok=True)
        outcome = f"finished the compaction into {merged}"
    else:  # not yet renamed: put the old parts back
        for name in replaced:
            if (directory / _aside(name)).exists():
                os.replace(directory / _aside(name), directory / name)
        (directory / tmp).unlink(missing_ok=True)
        outcome = f"undid the compaction into {merged} ({len(replaced)} part(s) restored)"
    journal_path.unlink(missing_ok=True)
    return outcome


def conform(table_name: str, data: pa.Table) -> pa.Table:
    """`data` with the table's columns in order and types (missing optional columns as nulls)."""
    if table_name not in TABLES:
        raise TraceError(f"unknown trace table {table_name!r}; tables are {', '.join(TABLES)}")
    table = TABLES[table_name]
    try:
        arrays = [
            data[c.name].cast(c.type) if c.name in data.column_names else pa.nulls(len(data), c.type)
            for c in table.columns
        ]
        return pa.Table.from_arrays(arrays, schema=table.arrow_schema())
    except pa.ArrowException as exc:  # invalid values or an impossible cast
        raise TraceError(f"rows for table {table_name!r} do not match its schema: {exc}") from exc


class TraceWriter:
    """Buffers rows per table and writes them as part files of a trace directory.

    Rows are buffered column-wise (a list per column), which is the cheapest way to append from a
    hot path. Unknown tables or columns raise at once, so a typo never silently drops data.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise TraceError(f"cannot write a trace to {self.path}: it exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._buffers: dict[str, dict[str, list[Any]]] = {}
        self._arrow_buffers: dict[str, list[pa.Table]] = {}
        self._parts_written: dict[str, list[str]] = {}

    def _buffer(self, table_name: str) -> dict[str, list[Any]]:
        buffer = self._buffers.get(table_name)
        if buffer is None:
            if table_name not in TABLES:
                raise TraceError(f"unknown trace table {table_name!r}; tables are {', '.join(TABLES)}")
            buffer = {name: [] for name in TABLES[table_name].column_names}
            self._buffers[table_name] = buffer
        return buffer

    def append(self, table_name: str, row: Mapping[str, Any]) -> None:
        """Add one row; columns missing from `row` become null."""
        buffer = self._buffer(table_name)
        unknown = set(row) - buffer.keys()
        if unknown:
            raise TraceError(f"table {table_name!r} has no column(s) {', '.join(sorted(unknown))}")
        for name, values in buffer.items():
            values.append(row.get(name))

    def extend(self, table_name: str, columns: Mapping[str, Sequence[Any]]) -> None:
        """Add many rows given column-wise; all sequences must have the same length."""
        buffer = self._buffer(table_name)
        unknown = set(columns) - buffer.keys()
        if unknown:
            raise TraceError(f"table {table_name!r} has no column(s) {', '.join(sorted(unknown))}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise TraceError(f"columns given for table {table_name!r} have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        for name, values in buffer.items():
            given = columns.get(name)
            values.extend(given if given is not None else [None] * n)

    def write_table(self, table_name: str, data: pa.Table) -> Path:
        """Write an already built (and, for compression, already sorted) table as one part."""
        return write_part(self.path / table_name, TABLES[table_name], conform(table_name, data))

    def extend_arrow(self, table_name: str, data: pa.Table) -> None:
        """Buffer rows given as an Arrow table (built vectorised); written with the next flush."""
        self._arrow_buffers.setdefault(table_name, []).append(conform(table_name, data))

    def pending_rows(self, table_name: str) -> int:
        buffer = self._buffers.get(table_name)
        listed = len(next(iter(buffer.values()))) if buffer else 0
        return listed + sum(len(t) for t in self._arrow_buffers.get(table_name, []))

    def flush(self) -> list[Path]:
        """Write every non-empty buffer as a new part file; return the paths written."""
        written = []
        for table_name in list(self._buffers.keys() | self._arrow_buffers.keys()):
            table = TABLES[table_name]
            chunks = self._arrow_buffers.pop(table_name, [])
            buffer = self._buffers.get(table_name)
            if buffer and next(iter(buffer.values())):
                chunks.insert(0, pa.Table.from_pydict(buffer, schema=table.arrow_schema()))
                for values in buffer.values():
                    values.clear()
            if not chunks:
                continue
            data = chunks[0] if len(chunks) == 1 else pa.concat_tables(chunks)
            path = write_part(self.path / table_name, table, data)
            written.append(path)
            self._parts_written.setdefault(table_name, []).append(path.name)
        return written

    def compact(self, tables: Iterable[str] | None = None) -> None:
        """Merge the parts this writer wrote into one sorted part per table."""
        for table_name in list(tables if tables is not None else self._parts_written):
            names = self._parts_written.get(table_name, [])
            table = TABLES[table_name]
            if table_name in NOT_COMPACTED or not names or (len(names) == 1 and not table.sort_keys):
                continue
            merged = compact_parts(self.path / table_name, table, names)
            self._parts_written[table_name] = [merged.name]

    def close(self, *, compact: bool = True) -> None:
        """Flush what is buffered and, by default, compact each table into one sorted part."""
        self.flush()
        if compact:
            self.compact()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
