"""Open trace directories, validate their parts, and check the format's invariants.

Needs only pyarrow. Structural problems (not a trace, unreadable or truncated part, another major
version, a missing required column, a wrong column type) raise `TraceError` with one sentence
naming the file, table and column. Invariant checks return a report instead, so `kvscope inspect`
can show every problem at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvscope.errors import TraceError
from kvscope.schema.tables import FORMAT_MAJOR, FORMAT_VERSION, META_FORMAT, META_REPLACES, TABLES, Column
from kvscope.trace.writer import PART_GLOB


@dataclass(frozen=True)
class PartInfo:
    """One Parquet part file of one table."""

    path: Path
    table: str
    format_version: str
    num_rows: int
    size_bytes: int
    column_names: tuple[str, ...]


@dataclass
class Trace:
    """A validated trace directory: its part files per table (superseded parts left out)."""

    path: Path
    parts: dict[str, list[PartInfo]] = field(default_factory=dict)

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
                data = pq.read_table(part.path, columns=columns)
            except (pa.ArrowException, OSError) as exc:
                raise TraceError(f"{part.path}: part file of table '{table}' cannot be read ({_first_line(exc)}).") from exc
            pieces.append(_conform(data, table))
        return pa.concat_tables(pieces)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
    """Validate one part file's footer; return its info and the parts it replaces."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(
            f"{path}: part file of table '{table}' is not a readable Parquet file, truncated or corrupt "
            f"({_first_line(exc)})."
        ) from exc
    kv = metadata.metadata or {}
    raw_version = kv.get(META_FORMAT)
    if raw_version is None:
        raise TraceError(f"{path}: part file of table '{table}' has no 'kvscope.format' metadata, so it is not a kvscope trace part.")
    version = raw_version.decode(errors="replace")
    major = _major(version)
    if major != FORMAT_MAJOR:
        raise TraceError(
            f"{path}: part file of table '{table}' is in trace format {version}, but this kvscope "
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
    replaces = [n for n in kv.get(META_REPLACES, b"").decode().split(",") if n]
    info = PartInfo(path, table, version, metadata.num_rows, path.stat().st_size, tuple(schema.names))
    return info, replaces


def _check_column(path: Path, table: str, schema: pa.Schema, col: Column) -> None:
    index = schema.get_field_index(col.name)
    if index < 0:
        raise TraceError(f"{path}: required column '{col.name}' of table '{table}' is missing.")
    actual = schema.field(index).type
    if not compatible(col.type, actual):
        raise TraceError(f"{path}: column '{col.name}' of table '{table}' has type {actual}, expected {col.type}.")


def is_trace_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_dir() for name in TABLES)


def find_traces(paths: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...]) -> list[Path]:
    """Expand each path to trace directories: a trace itself, or a folder whose children are traces."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TraceError(f"{path}: no such trace directory.")
        if not path.is_dir():
            raise TraceError(f"{path}: a trace is a directory of table folders (run/, steps/, layers/, ...), not a file.")
        if is_trace_dir(path):
            found.append(path)
            continue
        children = sorted(child for child in path.iterdir() if is_trace_dir(child))
        if not children:
            raise TraceError(f"{path}: not a kvscope trace (no run/, steps/ or layers/ folder) and holds no traces.")
        found.extend(children)
    return found


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open and structurally validate one trace directory."""
    path = Path(path)
    if not is_trace_dir(path):
        raise TraceError(f"{path}: not a kvscope trace (no run/, steps/ or layers/ folder).")
    trace = Trace(path)
    for table in TABLES:
        directory = path / table
        if not directory.is_dir():
            continue
        infos: dict[str, PartInfo] = {}
        superseded: set[str] = set()
        for part_path in sorted(directory.glob(PART_GLOB)):
            info, replaces = read_part_info(part_path, table)
            infos[part_path.name] = info
            superseded.update(replaces)
        trace.parts[table] = [info for name, info in infos.items() if name not in superseded]
    if trace.num_rows("run") == 0:
        raise TraceError(f"{path}: the trace has no run row (run/part-*.parquet missing or empty).")
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


def _keys(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.select(keys).group_by(keys).aggregate([])


def check_invariants(trace: Trace) -> InvariantReport:
    """Check the invariants of the format over the whole trace (vectorised, column subsets only)."""
    report = InvariantReport()
    run = trace.read("run", ["run_id"])
    run_ids = run["run_id"]
    if len(pc.unique(run_ids)) != len(run_ids):
        report.errors.append("run: run_id values are not unique (two run rows share an id).")
    known = pc.unique(run_ids)
    for table in TABLES:
        if table == "run" or trace.num_rows(table) == 0:
            continue
        ids = pc.unique(trace.read(table, ["run_id"])["run_id"])
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
    return report


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
