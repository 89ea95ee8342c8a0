"""The format's invariants: every page decoded, every value checked, queries under a memory limit.

`check_invariants` returns a report instead of raising, so `kvscope inspect` can show every problem
at once. It decodes every page (verifying page checksums where the writer wrote them) and runs its
queries in DuckDB with a memory limit, so a small trace that expands to billions of rows or a huge
string cannot exhaust memory. Structural problems (what `open_trace` refuses) live in `reader`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvscope.schema.tables import TABLES, Column
from kvscope.trace.reader import PartInfo, Trace, _first_line, shown
from kvscope.trace.text import clean

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
                problem = _check_values(part, batch.column(name), spec.column(name))
                if problem:
                    return problem
        if rows != part.num_rows:
            return (f"{shown(part.path)}: part of table '{part.table}' decodes to {rows:,} rows but its footer "
                    f"says {part.num_rows:,}.")
    except (pa.ArrowException, OSError, ValueError, EOFError, OverflowError) as exc:
        return (f"{shown(part.path)}: part file of table '{part.table}' has pages that cannot be decoded "
                f"(corrupt or damaged: {_first_line(exc)}).")
    return None


def _check_values(part: PartInfo, column: pa.Array, spec: Column) -> str | None:
    name, target = spec.name, spec.type
    # every reader may count on a value (run_id's nulls are counted per table by the cross-row checks)
    if column.null_count and spec.required and not spec.nullable and name != "run_id":
        return (f"{shown(part.path)}: column '{name}' of table '{part.table}' holds null values; the format "
                "requires a value in every row.")
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
                "(generate raised, see the events, or the recording was interrupted before it ended)."
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
            # a join's output order is not its inputs' (threads): the first by (gen_id, step), as in DuckDB
            first = orphans.sort_by([("gen_id", "ascending"), ("step", "ascending")]).slice(0, 1).to_pylist()[0]
            report.errors.append(
                f"layers: {len(orphans)} (gen_id, step) pair(s) have no steps row, first gen {first['gen_id']} "
                f"step {first['step']}."
            )
    if len(steps):
        gens = trace.read("generations", ["run_id", "gen_id"])
        missing = _keys(steps, ["run_id", "gen_id"]).join(gens, ["run_id", "gen_id"], join_type="left anti")
        for row in missing.sort_by([("run_id", "ascending"), ("gen_id", "ascending")]).to_pylist():
            report.warnings.append(
                f"generation {row['gen_id']} of run {row['run_id']} has steps but no generations row "
                "(generate raised, see the events, or the recording was interrupted before it ended)."
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
