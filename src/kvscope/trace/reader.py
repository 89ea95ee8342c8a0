"""Open trace directories and validate their parts (the format's invariants: `invariants`).

Structural problems (not a trace, unreadable or truncated part, another major version, a missing
required column, a wrong column type, a symlink out of the trace, a folder that cannot be read,
more parts than `MAX_PARTS`) raise `TraceError` with one sentence naming the file, table and
column. A trace is untrusted input: nothing in it is trusted to hide a part (`kvscope.replaces` is
only a record of what a compaction merged).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.errors import TraceError
from kvscope.schema.tables import FORMAT_MAJOR, FORMAT_VERSION, META_FORMAT, META_REPLACES, TABLES, Column
from kvscope.trace.text import clean
from kvscope.trace.writer import ASIDE_SUFFIX, JOURNAL_NAME, PART_GLOB, TMP_SUFFIX

# The most part files one trace may hold (all tables together). A recording flushes every 64
# steps and at every generate() boundary and compacts at close, so only a crashed recording of a
# long run comes near this; `kvscope compact TRACE` merges its parts (and opens it without limit).
MAX_PARTS = 10_000
# The largest uncompressed row group accepted: a highly compressible hostile value (a 1 GiB
# string that zstd packs into kilobytes) is refused from the footer, before anything is decoded.
# (A compacted layers row group of 1 M rows is about 200 MB.)
MAX_ROW_GROUP_BYTES = 512 << 20
MAX_ROW_GROUP_BYTES_BINARY = 4 << 30  # kv_samples.data holds raw tensors


@dataclass(frozen=True)
class PartInfo:
    """One Parquet part file of one table."""

    path: Path
    table: str
    format_version: str
    num_rows: int
    size_bytes: int
    column_names: tuple[str, ...]
    replaces: tuple[str, ...] = ()  # what its `kvscope.replaces` says it merged (never trusted to hide a part)


@dataclass
class Trace:
    """A structurally validated trace directory: its part files per table.

    `problems` are what opening found that makes the trace invalid without stopping the read
    (parts that claim to replace parts still present); `notes` are warnings (stray temporary
    files, an interrupted compaction). `check_invariants` reports both.
    """

    path: Path
    parts: dict[str, list[PartInfo]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def format_versions(self) -> list[str]:
        return sorted({p.format_version for parts in self.parts.values() for p in parts})

    def num_rows(self, table: str) -> int:
        return sum(p.num_rows for p in self.parts.get(table, []))

    def size_bytes(self, table: str) -> int:
        return sum(p.size_bytes for p in self.parts.get(table, []))

    def has_column(self, table: str, column: str) -> bool:
        parts = self.parts.get(table, [])
        return bool(parts) and all(column in p.column_names for p in parts)

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """Read a table's parts (only `columns`, if given) as one Arrow table."""
        schema = TABLES[table].arrow_schema()
        parts = self.parts.get(table, [])
        if columns is None:
            columns = [c for c in schema.names if all(c in p.column_names for p in parts)] if parts else schema.names
        if not parts:
            return pa.table({c: pa.array([], schema.field(c).type) for c in columns})
        pieces = []
        for part in parts:
            try:
                data = pq.read_table(part.path, columns=columns, page_checksum_verification=True)
                pieces.append(_conform(data, table))
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise TraceError(f"{shown(part.path)}: part file of table '{table}' cannot be read "
                                 f"({_first_line(exc)}).") from exc
        return pa.concat_tables(pieces)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return clean(text[0], 300) if text else type(exc).__name__


def shown(path: Path | str) -> str:
    """A path as an error message shows it: control characters and undecodable bytes escaped."""
    return clean(os.fsdecode(path) if isinstance(path, bytes) else str(path), 400)


def _conform(data: pa.Table, table: str) -> pa.Table:
    """Cast the columns of a part to the schema's types, so parts of other writers concatenate."""
    spec = TABLES[table]
    arrays, fields = [], []
    for name in data.column_names:
        try:
            col = spec.column(name)
        except KeyError:
            continue
        arrays.append(data[name].cast(col.type))
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def compatible(expected: pa.DataType, actual: pa.DataType) -> bool:
    """Whether a column's actual type is acceptable where the schema has `expected`.

    Other writers may use other integer widths, large strings or dictionary encoding; the
    contract is about the kind of value, not its physical width.
    """
    if pa.types.is_dictionary(actual):
        actual = actual.value_type
    checks = (
        (pa.types.is_integer, pa.types.is_integer),
        (pa.types.is_floating, lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
        (pa.types.is_boolean, pa.types.is_boolean),
        (pa.types.is_timestamp, pa.types.is_timestamp),
        (pa.types.is_binary, lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
        (pa.types.is_string, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    )
    for is_expected, accepts in checks:
        if is_expected(expected):
            return bool(accepts(actual))
    if pa.types.is_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual)):
            return False
        return compatible(expected.value_type, actual.value_type)
    return expected == actual


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def read_part_info(path: Path, table: str) -> tuple[PartInfo, list[str]]:
    """Validate one part file's footer; return its info and the parts it says it replaces."""
    try:
        return _read_part_info(path, table)
    except TraceError:
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError, OverflowError) as exc:  # a damaged footer
        raise TraceError(f"{shown(path)}: part file of table '{table}' has a damaged footer "
                         f"({_first_line(exc)}).") from exc


def _read_part_info(path: Path, table: str) -> tuple[PartInfo, list[str]]:
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
        size = path.stat().st_size
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TraceError(
            f"{shown(path)}: part file of table '{table}' is not a readable Parquet file, truncated or corrupt "
            f"({_first_line(exc)})."
        ) from exc
    kv = metadata.metadata or {}
    raw_version = kv.get(META_FORMAT)
    if raw_version is None:
        raise TraceError(f"{shown(path)}: part file of table '{table}' has no 'kvscope.format' metadata, "
                         "so it is not a kvscope trace part.")
    version = clean(raw_version.decode(errors="replace"), 40)
    major = _major(version)
    if major != FORMAT_MAJOR:
        raise TraceError(
            f"{shown(path)}: part file of table '{table}' is in trace format {version}, but this kvscope "
            f"reads format {FORMAT_MAJOR}.x (it writes {FORMAT_VERSION}); use a kvscope release for format {version}."
        )
    for col in TABLES[table].required_columns:
        _check_column(path, table, schema, col)
    for name in schema.names:  # optional columns, where present, must have the right kind too
        try:
            col = TABLES[table].column(name)
        except KeyError:
            continue
        if not col.required:
            _check_column(path, table, schema, col)
    if len(set(schema.names)) != len(schema.names):
        raise TraceError(f"{shown(path)}: part file of table '{table}' has two columns of the same name.")
    _check_chunk_sizes(path, table, metadata)
    replaces = [n for n in kv.get(META_REPLACES, b"").decode(errors="replace").split(",") if n]
    info = PartInfo(path, table, version, metadata.num_rows, size, tuple(schema.names), tuple(replaces))
    return info, replaces


def _check_chunk_sizes(path: Path, table: str, metadata: pq.FileMetaData) -> None:
    """Refuse row groups that expand beyond the limit, from the footer alone.

    Row-group totals, not per-column chunk metadata: pyarrow aborts the process (C++ terminate)
    when it builds the metadata of a column chunk whose size statistics are malformed (found by
    scripts/fuzz_traces.py), while reading the data raises a catchable error.
    """
    limit = MAX_ROW_GROUP_BYTES_BINARY if table == "kv_samples" else MAX_ROW_GROUP_BYTES
    for i in range(metadata.num_row_groups):
        size = metadata.row_group(i).total_byte_size
        if size > limit or size < 0:
            raise TraceError(
                f"{shown(path)}: row group {i} of table '{table}' expands to {size:,} bytes (more than the "
                f"{limit:,} bytes kvscope accepts), so it is refused before it is decoded."
            )


def _check_column(path: Path, table: str, schema: pa.Schema, col: Column) -> None:
    index = schema.get_field_index(col.name)
    if index < 0:
        raise TraceError(f"{shown(path)}: required column '{col.name}' of table '{table}' is missing.")
    actual = schema.field(index).type
    if not compatible(col.type, actual):
        raise TraceError(f"{shown(path)}: column '{col.name}' of table '{table}' has type {clean(actual, 100)}, "
                         f"expected {col.type}.")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TraceError(f"{shown(path)}: cannot be read ({exc.strerror or exc}).") from exc


def _inside(path: Path, root: Path, what: str) -> Path:
    """Resolve `path` (following symlinks) and refuse loops and anything outside `root`."""
    try:
        resolved = path.resolve(strict=True)
    except RuntimeError as exc:  # Python < 3.13 reports a symlink loop so
        raise TraceError(f"{shown(path)}: {what} is a symlink loop.") from exc
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            raise TraceError(f"{shown(path)}: {what} is a symlink loop.") from exc
        raise TraceError(f"{shown(path)}: {what} is a broken symlink or cannot be read "
                         f"({exc.strerror or exc}).") from exc
    if resolved != root and root not in resolved.parents:
        raise TraceError(f"{shown(path)}: {what} is a symlink to {shown(resolved)}, outside the trace; "
                         "kvscope reads nothing outside a trace's directory.")
    return resolved


def _table_dir(path: Path, root: Path, table: str) -> Path | None:
    """The folder of a table, or None where the trace has none; refuses anything unreadable or outside."""
    directory = path / table
    st = _lstat(directory)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        resolved = _inside(directory, root, f"table folder '{table}'")
        st = os.stat(resolved)
    if not stat.S_ISDIR(st.st_mode):
        raise TraceError(f"{shown(directory)}: table '{table}' must be a folder of part files, not a file.")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise TraceError(f"{shown(directory)}: table folder '{table}' cannot be read (permission denied), "
                         "so the trace cannot be read whole.")
    return directory


def is_trace_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    for name in TABLES:
        try:
            st = os.lstat(path / name)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            return True
    return False


def find_traces(paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...]) -> list[Path]:
    """Expand each path to trace directories: a trace itself, or a folder whose children are traces."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TraceError(f"{shown(path)}: no such trace directory.")
        if not path.is_dir():
            raise TraceError(f"{shown(path)}: a trace is a directory of table folders (run/, steps/, layers/, ...), "
                             "not a file.")
        if is_trace_dir(path):
            found.append(path)
            continue
        try:
            children = sorted(child for child in path.iterdir() if is_trace_dir(child))
        except OSError as exc:
            raise TraceError(f"{shown(path)}: cannot be read ({exc.strerror or exc}).") from exc
        if not children:
            raise TraceError(f"{shown(path)}: not a kvscope trace (no run/, steps/ or layers/ folder) "
                             "and holds no traces.")
        found.extend(children)
    return found


def _listdir(directory: Path, table: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as exc:
        raise TraceError(f"{shown(directory)}: table folder '{table}' cannot be read "
                         f"({exc.strerror or exc}).") from exc


def _list_parts(directory: Path, names: list[str], root: Path, table: str, trace: Trace) -> list[Path]:
    """The part files among a table folder's `names`; notes stray and aside files."""
    parts = []
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            if fnmatch.fnmatchcase(name, PART_GLOB):
                raise TraceError(f"{shown(directory)}: a part file's name is not valid UTF-8 "
                                 f"({ascii(name)}); rename or remove it.") from None
            continue
        if name.endswith(TMP_SUFFIX):
            trace.notes.append(f"{table}: stray temporary file {clean(name, 120)} (a writer was killed while "
                               "writing it); it is not read, and `kvscope compact` removes it.")
            continue
        if name.endswith(ASIDE_SUFFIX) or name == JOURNAL_NAME:
            if not any(n.startswith("interrupted compaction") for n in trace.notes):
                trace.notes.append(f"interrupted compaction in {table}/ (old parts set aside, {JOURNAL_NAME}); "
                                   "every reader sees the same parts, but run `kvscope compact` to finish it.")
            continue
        if not fnmatch.fnmatchcase(name, PART_GLOB):
            continue
        part = directory / name
        st = _lstat(part)
        if st is None:  # removed since the listing (a compaction finishing): the caller retries
            raise _Vanished(part)
        if stat.S_ISLNK(st.st_mode):
            _inside(part, root, f"part file of table '{table}'")
            st = os.stat(part)
        if not stat.S_ISREG(st.st_mode):
            raise TraceError(f"{shown(part)}: part of table '{table}' is not a regular file.")
        parts.append(part)
    return parts


class _Vanished(Exception):
    """A part listed a moment ago is gone (a writer compacting): the trace is read again."""


def open_trace(path: str | os.PathLike[str], *, max_parts: int | None = MAX_PARTS) -> Trace:
    """Open and structurally validate one trace directory.

    Reads only footers. A part removed while it is opened (a recording compacting at close) makes
    it read the listing again, a few times, so the parts it returns existed together.
    """
    for attempt in range(5):
        try:
            return _open_trace(Path(path), max_parts)
        except _Vanished as gone:
            if attempt == 4:
                raise TraceError(f"{shown(gone.args[0])}: parts keep disappearing while the trace is read "
                                 "(a writer is still compacting it); try again when it is done.") from None
    raise AssertionError("unreachable")


def _open_trace(path: Path, max_parts: int | None) -> Trace:
    if not is_trace_dir(path):
        raise TraceError(f"{shown(path)}: not a kvscope trace (no run/, steps/ or layers/ folder).")
    try:
        root = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise TraceError(f"{shown(path)}: cannot be read ({exc}).") from exc
    trace = Trace(path)
    names: dict[str, tuple[Path, list[str]]] = {}
    for table in TABLES:
        directory = _table_dir(path, root, table)
        if directory is not None:
            names[table] = (directory, _listdir(directory, table))
    total = sum(1 for _d, entries in names.values() for n in entries if fnmatch.fnmatchcase(n, PART_GLOB))
    if max_parts is not None and total > max_parts:  # counted from the listing, before any part is opened
        raise TraceError(f"{shown(path)}: the trace holds {total:,} part files, more than the {max_parts:,} kvscope "
                         "reads (a crashed recording's flushes); merge them with `kvscope compact TRACE`.")
    listed = {table: _list_parts(directory, entries, root, table, trace)
              for table, (directory, entries) in names.items()}
    for table, part_paths in listed.items():
        infos: dict[str, PartInfo] = {}
        claims: dict[str, list[str]] = {}
        for part_path in part_paths:
            try:
                info, replaces = read_part_info(part_path, table)
            except TraceError:
                if not part_path.exists():
                    raise _Vanished(part_path) from None
                raise
            infos[part_path.name] = info
            if replaces:
                claims[part_path.name] = replaces
        for name, replaces in claims.items():  # recorded, never trusted to hide a part
            present = [r for r in replaces if r in infos and r != name]
            if present:
                rows = sum(infos[r].num_rows for r in present)
                trace.problems.append(
                    f"{table}: part {clean(name, 80)} says it merged {len(present)} part(s) that are still present "
                    f"({clean(present[0], 80)}{', ...' if len(present) > 1 else ''}), so {rows:,} rows are read twice "
                    "by every reader (an interrupted compaction of an older kvscope); `kvscope compact` repairs it."
                )
        trace.parts[table] = list(infos.values())
    if trace.num_rows("run") == 0:
        raise TraceError(f"{shown(path)}: the trace has no run row (run/part-*.parquet missing or empty).")
    return trace


def open_traces(paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...]) -> list[Trace]:
    return [open_trace(p) for p in find_traces(paths)]
