"""Open trace directories, validate their parts, and check the format's invariants.

Structural problems (not a trace, unreadable or truncated part, another major version, a missing
required column, a wrong column type, a symlink out of the trace, a folder that cannot be read,
more parts than `MAX_PARTS`) raise `TraceError` with one sentence naming the file, table and
column. Invariant checks return a report instead, so `kvscope inspect` can show every problem at
once; they decode every page (verifying page checksums where the writer wrote them) and run their
queries in DuckDB with a memory limit, so a small trace that expands to billions of rows or a
huge string cannot exhaust memory. A trace is untrusted input: nothing in it is trusted to hide
a part (`kvscope.replaces` is only a record of what a compaction merged).
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
# The longest string value accepted, and for the key columns that every query groups by.
MAX_STRING_CHARS = 16 << 20
MAX_KEY_CHARS = 1024
KEY_COLUMNS = frozenset({"run_id", "prompt_id", "layer_type", "k_dtype", "v_dtype", "kind", "tensor", "stat"})
# JSON columns (run: model_config, labels, options; events: detail): at most this long and this deep.
MAX_JSON_CHARS = 1 << 20
MAX_JSON_DEPTH = 64
JSON_COLUMNS = {"run": ("model_config", "labels", "options"), "events": ("detail",)}
# Nanosecond-representable instants (years 1678-2262): every reader can hold them.
MAX_ABS_TIMESTAMP_US = (1 << 63) // 1000 - 1
# Rows decoded at a time by the invariant check's decode pass.
BATCH_ROWS = 65_536


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


@dataclass
class InvariantReport:
    """Problems found by `check_invariants`: errors make a trace invalid, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_invariants(trace: Trace, *, memory_limit: str = "512MB", threads: int = 2) -> InvariantReport:
    """Check the invariants of the format over the whole trace, in bounded memory.

    First every page of every part is decoded (page checksums verified where written, values cast
    to the schema's types) one batch at a time; then the checks across rows run as DuckDB queries
    under `memory_limit`, spilling to a private temporary folder.
    """
    report = InvariantReport(errors=list(trace.problems), warnings=list(trace.notes))
    for parts in trace.parts.values():
        for part in parts:
            problem = decode_part(part)
            if problem:
                report.errors.append(problem)
    if report.errors:  # the cross-row checks would only repeat a decode error
        return report
    _check_run_values(trace, report)
    try:
        import duckdb
    except ImportError:  # a GPU host without duckdb: the checks that fit in memory
        _check_in_memory(trace, report)
        return report
    from kvscope.trace.duck import Scratch, connect, execute_one, quote_ident, view_sql

    scratch = Scratch()
    con = connect(threads, memory_limit, scratch)
    try:
        for name, table in TABLES.items():
            parts = trace.parts.get(name, [])
            present = {c for p in parts for c in p.column_names}
            execute_one(con, f"CREATE VIEW {quote_ident(name)} AS {view_sql(table, [p.path for p in parts], present)}")
        _check_with_duckdb(con, trace, report, quote_ident)
    except duckdb.OutOfMemoryException as exc:
        report.errors.append(f"{shown(trace.path)}: checking the trace ran out of memory (limit {memory_limit}): "
                             f"{_first_line(exc)}")
    except duckdb.Error as exc:
        report.errors.append(f"{shown(trace.path)}: the trace's data cannot be read: {_first_line(exc)}")
    finally:
        con.close()
        scratch.close()
    return report


def decode_part(part: PartInfo) -> str | None:
    """Decode every page of one part (checksums verified, values cast); the problem, or None.

    Strings are read dictionary-encoded, so a value repeated a billion times is held once, and
    no string may be longer than `MAX_STRING_CHARS` (`MAX_KEY_CHARS` for key columns).
    """
    spec = TABLES[part.table]
    known = [c for c in part.column_names if c in spec.column_names]
    text = [c for c in known if pa.types.is_string(spec.column(c).type) or pa.types.is_binary(spec.column(c).type)]
    binary = any(pa.types.is_binary(spec.column(c).type) for c in known)
    try:
        parquet = pq.ParquetFile(part.path, page_checksum_verification=True, read_dictionary=text)
        rows = 0
        for batch in parquet.iter_batches(batch_size=16 if binary else BATCH_ROWS, columns=known, use_threads=False):
            rows += batch.num_rows
            for name in batch.schema.names:
                problem = _check_values(part, name, batch.column(name), spec.column(name).type)
                if problem:
                    return problem
        if rows != part.num_rows:
            return (f"{shown(part.path)}: part of table '{part.table}' decodes to {rows:,} rows but its footer "
                    f"says {part.num_rows:,}.")
    except (pa.ArrowException, OSError, ValueError, EOFError, OverflowError) as exc:
        return (f"{shown(part.path)}: part file of table '{part.table}' has pages that cannot be decoded "
                f"(corrupt or damaged: {_first_line(exc)}).")
    return None


def _check_values(part: PartInfo, name: str, column: pa.Array, target: pa.DataType) -> str | None:
    values = column.dictionary if pa.types.is_dictionary(column.type) else column
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or (
            pa.types.is_binary(values.type) and not pa.types.is_binary(target)):
        limit = MAX_KEY_CHARS if name in KEY_COLUMNS else MAX_STRING_CHARS
        longest = pc.max(pc.binary_length(values)).as_py() if len(values) else None
        if longest is not None and longest > limit:
            return (f"{shown(part.path)}: column '{name}' of table '{part.table}' holds a value of {longest:,} "
                    f"bytes (at most {limit:,}).")
    try:
        values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        return (f"{shown(part.path)}: column '{name}' of table '{part.table}' holds values that do not "
                f"fit {target} ({_first_line(exc)}).")
    return None


def _json_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_json(value: str, where: str) -> str | None:
    if len(value) > MAX_JSON_CHARS:
        return f"{where} is {len(value):,} characters long (at most {MAX_JSON_CHARS:,})."
    if _json_depth(value) > MAX_JSON_DEPTH:
        return f"{where} nests deeper than {MAX_JSON_DEPTH} levels."
    try:
        loaded = json.loads(value, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return f"{where} is not valid JSON ({clean(exc, 120)})."
    if not isinstance(loaded, dict):
        return f"{where} must be a JSON object, not {type(loaded).__name__}."
    return None


def _check_run_values(trace: Trace, report: InvariantReport) -> None:
    """The run table's JSON columns and every timestamp: well formed and in range (streamed)."""
    for table, parts in trace.parts.items():
        spec = TABLES[table]
        ts_cols = [c.name for c in spec.columns if pa.types.is_timestamp(c.type)]
        json_cols = [c for c in JSON_COLUMNS.get(table, ()) if c in spec.column_names]
        for part in parts:
            wanted = [c for c in (*ts_cols, *json_cols) if c in part.column_names]
            if not wanted:
                continue
            parquet = pq.ParquetFile(part.path)
            for batch in parquet.iter_batches(batch_size=1024, columns=wanted, use_threads=False):
                for name in ts_cols:
                    if name not in batch.schema.names:
                        continue
                    raw = pc.cast(batch.column(name).cast(pa.timestamp("us")), pa.int64())
                    bounds = pc.min_max(pc.abs_checked(raw)) if len(raw) else None
                    if bounds is not None and (bounds["max"].as_py() or 0) > MAX_ABS_TIMESTAMP_US:
                        report.errors.append(f"{table}: column '{name}' holds an instant outside the years "
                                             f"1678-2262 ({shown(part.path)}).")
                        return
                for name in json_cols:
                    if name not in batch.schema.names:
                        continue
                    for value in batch.column(name).to_pylist():
                        problem = _check_json(value, f"{table}.{name}") if isinstance(value, str) else None
                        if problem:
                            report.errors.append(f"{problem[:-1]} ({shown(part.path)}).")
                            return


def _check_with_duckdb(con: Any, trace: Trace, report: InvariantReport, ident: Any) -> None:
    def one(query: str) -> tuple[Any, ...] | None:
        rows = con.execute(query).fetchmany(1)
        return rows[0] if rows else None

    dup = one("SELECT run_id FROM run GROUP BY run_id HAVING count(*) > 1 LIMIT 1")
    if dup is not None:
        report.errors.append("run: run_id values are not unique (two run rows share an id).")
    for table in TABLES:
        if trace.num_rows(table) == 0:
            continue
        nulls = one(f"SELECT count(*) FROM {ident(table)} WHERE run_id IS NULL")
        if nulls and nulls[0]:
            report.errors.append(f"{table}: {nulls[0]:,} row(s) have no run_id.")
        if table != "run":
            stray = one(f"SELECT run_id FROM (SELECT DISTINCT run_id FROM {ident(table)} WHERE run_id IS NOT NULL) "
                        "ANTI JOIN run USING (run_id) LIMIT 1")
            if stray is not None:
                report.errors.append(f"{table}: run_id {clean(stray[0], 80)!r} has no row in the run table.")
        byte_cols = [c.name for c in TABLES[table].columns
                     if (c.unit in ("bytes", "tokens") and c.type == pa.int64()) and trace.has_column(table, c.name)]
        if byte_cols:
            lows = one("SELECT " + ", ".join(f"min({ident(c)})" for c in byte_cols) + f" FROM {ident(table)}")
            for name, low in zip(byte_cols, lows or (), strict=False):
                if low is not None and low < 0:
                    report.errors.append(f"{table}: column '{name}' has a negative value ({low}).")
    if trace.num_rows("steps"):
        low = one("SELECT min(step) FROM steps")
        if low and low[0] is not None and low[0] < 0:
            report.errors.append(f"steps: step numbers must be >= 0, found {int(low[0])}.")
        dup = one("SELECT step, gen_id FROM steps GROUP BY run_id, gen_id, step HAVING count(*) > 1 "
                  "ORDER BY gen_id, step LIMIT 1")
        if dup is not None:
            report.errors.append(f"steps: step {dup[0]} of generation {dup[1]} appears more than once.")
        back = one("SELECT step, gen_id FROM (SELECT gen_id, step, t_ns, lag(t_ns) OVER "
                   "(PARTITION BY run_id, gen_id ORDER BY step) AS prev FROM steps) WHERE t_ns < prev "
                   "ORDER BY gen_id, step LIMIT 1")
        if back is not None:
            report.errors.append(
                f"steps: t_ns goes backwards at step {back[0]} of generation {back[1]}: steps must "
                "increase in time within a generation."
            )
    if trace.num_rows("layers"):
        orphans = one("SELECT count(*), min(gen_id), arg_min(step, gen_id) FROM (SELECT DISTINCT run_id, gen_id, step "
                      "FROM layers) ANTI JOIN steps USING (run_id, gen_id, step)")
        if orphans and orphans[0]:
            first = one("SELECT gen_id, step FROM (SELECT DISTINCT run_id, gen_id, step FROM layers) "
                        "ANTI JOIN steps USING (run_id, gen_id, step) ORDER BY gen_id, step LIMIT 1")
            assert first is not None
            report.errors.append(
                f"layers: {orphans[0]} (gen_id, step) pair(s) have no steps row, first gen {first[0]} "
                f"step {first[1]}."
            )
    if trace.num_rows("steps"):
        missing = con.execute("SELECT run_id, gen_id FROM (SELECT DISTINCT run_id, gen_id FROM steps) "
                              "ANTI JOIN generations USING (run_id, gen_id) ORDER BY run_id, gen_id LIMIT 21").fetchall()
        for run_id, gen_id in missing[:20]:
            report.warnings.append(
                f"generation {gen_id} of run {clean(run_id, 80)} has steps but no generations row "
                "(the recording was interrupted before it ended)."
            )
        if len(missing) > 20:
            report.warnings.append("more generations have steps but no generations row (first 20 listed).")


def _keys(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.select(keys).group_by(keys).aggregate([])


def _check_in_memory(trace: Trace, report: InvariantReport) -> None:
    """The checks of `_check_with_duckdb` with pyarrow, whole columns in memory (no duckdb installed)."""
    run = trace.read("run", ["run_id"])
    run_ids = run["run_id"]
    if len(pc.unique(run_ids)) != len(run_ids):
        report.errors.append("run: run_id values are not unique (two run rows share an id).")
    known = pc.unique(run_ids)
    for table in TABLES:
        if table == "run" or trace.num_rows(table) == 0:
            continue
        column = trace.read(table, ["run_id"])["run_id"]
        if column.null_count:
            report.errors.append(f"{table}: {column.null_count:,} row(s) have no run_id.")
        ids = pc.drop_null(pc.unique(column))
        stray = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=known)))
        if len(stray):
            report.errors.append(f"{table}: run_id {stray[0].as_py()!r} has no row in the run table.")
    for table in TABLES:
        if trace.num_rows(table) == 0:
            continue
        byte_cols = [c.name for c in TABLES[table].columns
                     if (c.unit in ("bytes", "tokens") and c.type == pa.int64()) and trace.has_column(table, c.name)]
        if not byte_cols:
            continue
        data = trace.read(table, byte_cols)
        for name in byte_cols:
            low = pc.min(data[name]).as_py()
            if low is not None and low < 0:
                report.errors.append(f"{table}: column '{name}' has a negative value ({low}).")
    steps = trace.read("steps", ["run_id", "gen_id", "step", "t_ns"])
    if len(steps):
        _check_steps(steps, report)
    if trace.num_rows("layers"):
        layer_keys = _keys(trace.read("layers", ["run_id", "gen_id", "step"]), ["run_id", "gen_id", "step"])
        orphans = layer_keys.join(_keys(steps, ["run_id", "gen_id", "step"]), ["run_id", "gen_id", "step"],
                                  join_type="left anti")
        if len(orphans):
            first = orphans.slice(0, 1).to_pylist()[0]
            report.errors.append(
                f"layers: {len(orphans)} (gen_id, step) pair(s) have no steps row, first gen {first['gen_id']} "
                f"step {first['step']}."
            )
    if len(steps):
        gens = trace.read("generations", ["run_id", "gen_id"])
        missing = _keys(steps, ["run_id", "gen_id"]).join(gens, ["run_id", "gen_id"], join_type="left anti")
        for row in missing.to_pylist():
            report.warnings.append(
                f"generation {row['gen_id']} of run {row['run_id']} has steps but no generations row "
                "(the recording was interrupted before it ended)."
            )


def _check_steps(steps: pa.Table, report: InvariantReport) -> None:
    ordered = steps.sort_by([("run_id", "ascending"), ("gen_id", "ascending"), ("step", "ascending")])
    gen = np.asarray(ordered["gen_id"].to_numpy(zero_copy_only=False))
    run = pc.dictionary_encode(ordered["run_id"]).combine_chunks().indices.to_numpy(zero_copy_only=False)
    step = np.asarray(ordered["step"].to_numpy(zero_copy_only=False))
    t_ns = np.asarray(ordered["t_ns"].to_numpy(zero_copy_only=False))
    if step.min() < 0:
        report.errors.append(f"steps: step numbers must be >= 0, found {int(step.min())}.")
    same = (gen[1:] == gen[:-1]) & (run[1:] == run[:-1])
    duplicate = same & (step[1:] == step[:-1])
    if duplicate.any():
        i = int(np.argmax(duplicate))
        report.errors.append(f"steps: step {int(step[i])} of generation {int(gen[i])} appears more than once.")
    backwards = same & (t_ns[1:] < t_ns[:-1])
    if backwards.any():
        i = int(np.argmax(backwards)) + 1
        report.errors.append(
            f"steps: t_ns goes backwards at step {int(step[i])} of generation {int(gen[i])}: steps must "
            "increase in time within a generation."
        )
