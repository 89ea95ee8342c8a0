"""Build a corpus of hostile and malformed traces by mutating one valid synthetic trace.

    python scripts/make_hostile_traces.py OUT_DIR        # writes OUT_DIR/base and OUT_DIR/<case>/

Each case says what every command (`inspect`, `analyze`, `sql`, `diff`) must do with it:
`error` (one line, exit 2, naming the file and the problem: `match` is a word of that line) or
`ok` (read correctly: `layers` is the row count `SELECT count(*) FROM layers` must give).
`tests/hardening/test_corpus.py` builds the corpus in a temporary folder and runs every command
on every case; nothing binary is committed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.schema.tables import META_FORMAT, META_REPLACES, META_TABLE
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

BASE_SPEC = SynthSpec(num_layers=2, generations=2, steps=16)
BASE_LAYERS = 2 * 2 * 16  # rows of the base trace's layers table


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "error" or "ok"
    match: str = ""  # for errors: a word the error line holds
    layers: int = BASE_LAYERS  # for ok: rows of layers every reader sees
    needs_non_root: bool = False


def part(trace: Path, table: str, index: int = 0) -> Path:
    return sorted((trace / table).glob("part-*.parquet"))[index]


def rewrite(path: Path, edit: Callable[[pa.Table], pa.Table], metadata: dict[bytes, bytes] | None = None,
            **options: object) -> None:
    data = pq.read_table(path)
    keep = dict(data.schema.metadata or {})
    out = edit(data)
    out = out.replace_schema_metadata(metadata if metadata is not None else keep)
    pq.write_table(out, path, **options)  # type: ignore[arg-type]


def set_col(data: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = data.schema.get_field_index(name)
    return data.set_column(i, pa.field(name, values.type), values)


def fill(name: str, value: object, typ: pa.DataType | None = None) -> Callable[[pa.Table], pa.Table]:
    return lambda d: set_col(d, name, pa.array([value] * d.num_rows, typ))


def flip_at(path: Path, start: int, count: int = 8) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(start, min(start + count, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def flip_pages(path: Path, column: str | None = None) -> None:
    """Flip bytes in the middle of the data of a column chunk (the largest one, or `column`'s)."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunks = [meta.column(j) for j in range(meta.num_columns)]
    if column is not None:
        chunks = [c for c in chunks if c.path_in_schema.split(".")[0] == column]
    chunk = max(chunks, key=lambda c: c.total_compressed_size)
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size - 6
    flip_at(path, start, 3)


def run_edit(trace: Path, name: str, value: object) -> None:
    rewrite(part(trace, "run"), fill(name, value, pa.string()))


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- the cases: name -> (Case, mutation of a copy of the base trace) ---------------------------

Mutation = Callable[[Path], None]
CASES: list[tuple[Case, Mutation]] = []


def case(name: str, expect: str, match: str = "", layers: int = BASE_LAYERS,
         needs_non_root: bool = False) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        CASES.append((Case(name, expect, match, layers, needs_non_root), fn))
        return fn
    return register


# structure
case("no_tables", "error", "not a kvscope trace")(lambda t: [shutil.rmtree(p) for p in list(t.iterdir())] and None)
case("no_run_folder", "error", "no run row")(lambda t: shutil.rmtree(t / "run"))
case("empty_run_folder", "error", "no run row")(lambda t: part(t, "run").unlink())
case("zero_byte_run_part", "error", "run")(lambda t: part(t, "run").write_bytes(b""))
case("truncated_run_part", "error", "truncated")(lambda t: part(t, "run").write_bytes(part(t, "run").read_bytes()[:300]))
case("truncated_layers_part", "error", "layers")(
    lambda t: part(t, "layers").write_bytes(part(t, "layers").read_bytes()[:-40]))
case("garbage_layers_part", "error", "layers")(lambda t: part(t, "layers").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1"))
case("text_as_steps_part", "error", "steps")(lambda t: part(t, "steps").write_text("run_id,step\nx,1\n"))
case("footer_length_corrupt", "error", "layers")(lambda t: flip_at(part(t, "layers"), part(t, "layers").stat().st_size - 8, 4))
case("footer_metadata_corrupt", "error", "layers")(lambda t: flip_at(part(t, "layers"), part(t, "layers").stat().st_size - 200, 16))
def _footer_not_utf8(t: Path) -> None:
    """A column path in the footer that is not UTF-8 (what the fuzzer found first)."""
    target = part(t, "layers")
    rewrite(target, lambda d: d.append_column("extra_\u00e9", pa.array([1] * d.num_rows)))
    raw = target.read_bytes()
    assert b"extra_\xc3\xa9" in raw
    target.write_bytes(raw.replace(b"extra_\xc3\xa9", b"extra_\xc3\x28"))


case("footer_column_name_not_utf8", "error", "layers")(_footer_not_utf8)
case("bitflip_layers_pages", "error", "layers")(lambda t: flip_pages(part(t, "layers")))
case("bitflip_layers_kv_bytes", "error", "layers")(lambda t: flip_pages(part(t, "layers"), "kv_bytes"))
case("bitflip_steps_pages", "error", "steps")(lambda t: flip_pages(part(t, "steps")))
case("bitflip_steps_t_ns", "error", "steps")(lambda t: flip_pages(part(t, "steps"), "t_ns"))
case("bitflip_run_pages", "error", "run")(lambda t: flip_pages(part(t, "run")))
case("bitflip_run_model_config", "error", "run")(lambda t: flip_pages(part(t, "run"), "model_config"))
case("bitflip_generations_pages", "error", "generations")(lambda t: flip_pages(part(t, "generations")))
case("table_is_a_file", "error", "not a file")(
    lambda t: (shutil.rmtree(t / "events", ignore_errors=True), (t / "events").write_text("x")) and None)
case("part_is_a_folder", "error", "not a regular file")(lambda t: (t / "layers" / "part-dir.parquet").mkdir())

# format metadata
case("no_format_metadata", "error", "kvscope.format")(
    lambda t: rewrite(part(t, "layers"), lambda d: d, {META_TABLE: b"layers"}))
case("future_major", "error", "format 2.0")(
    lambda t: rewrite(part(t, "layers"), lambda d: d, {META_FORMAT: b"2.0", META_TABLE: b"layers"}))
case("format_banana", "error", "banana")(
    lambda t: rewrite(part(t, "steps"), lambda d: d, {META_FORMAT: b"banana", META_TABLE: b"steps"}))
case("format_escape_sequence", "error", "format")(
    lambda t: rewrite(part(t, "steps"), lambda d: d, {META_FORMAT: b"9\x1b[2J", META_TABLE: b"steps"}))
case("newer_minor", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: d.append_column("future", pa.array([1] * d.num_rows)),
                      {META_FORMAT: b"1.999", META_TABLE: b"layers"}))
case("replaces_not_utf8", "error", "read twice")(
    lambda t: rewrite(part(t, "layers", 1), lambda d: d, {META_FORMAT: b"1.0", META_TABLE: b"layers",
                                                         META_REPLACES: b"\xff\xfe," + part(t, "layers", 0).name.encode()}))
case("replaces_hides_real_part", "error", "read twice")(
    lambda t: rewrite(part(t, "layers", 1), lambda d: d, {META_FORMAT: b"1.0", META_TABLE: b"layers",
                                                         META_REPLACES: part(t, "layers", 0).name.encode()}))
case("replaces_names_itself_and_absent", "ok")(
    lambda t: rewrite(part(t, "layers", 0), lambda d: d, {META_FORMAT: b"1.0", META_TABLE: b"layers",
                                                         META_REPLACES: b"part-gone.parquet," + part(t, "layers", 0).name.encode()}))

# columns and types
case("missing_required_column", "error", "k_bytes")(lambda t: rewrite(part(t, "layers"), lambda d: d.drop_columns(["k_bytes"])))
case("string_where_int", "error", "kv_bytes")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "kv_bytes", pa.array(["1"] * d.num_rows))))
case("string_where_list", "error", "k_shape")(
    lambda t: rewrite(part(t, "layers"), lambda d: set_col(d, "k_shape", pa.array(["[1]"] * d.num_rows))))
case("int64_overflowing_int32", "error", "int32")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "gen_id", pa.array([2**40] * d.num_rows, pa.int64()))))
case("int64_fitting_int32", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: set_col(d, "layer", d["layer"].cast(pa.int64()))))
case("uint64_huge_bytes", "error", "int64")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "kv_bytes", pa.array([2**64 - 1] * d.num_rows, pa.uint64()))))
case("float_where_int", "error", "step")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "step", pa.array([0.5] * d.num_rows))))
case("duplicate_column_names", "error", "step")(
    lambda t: rewrite(part(t, "steps"), lambda d: pa.Table.from_arrays(
        [*d.columns, d["step"]], names=[*d.column_names, "step"])))
case("sql_injection_column_name", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: d.append_column(
        'x" FROM (SELECT 1 AS "x"); COPY (SELECT 42) TO \'pwned.csv\'; SELECT "x', pa.array([1] * d.num_rows))))
case("control_chars_column_name", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: d.append_column("\x1b[2J\x1b]0;t\x07", pa.array([1] * d.num_rows))))
case("dictionary_strings", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: set_col(d, "layer_type", d["layer_type"].dictionary_encode())))
case("large_string_and_large_list", "ok")(
    lambda t: rewrite(part(t, "layers"), lambda d: set_col(set_col(d, "k_dtype", d["k_dtype"].cast(pa.large_string())),
                                                            "k_shape", d["k_shape"].cast(pa.large_list(pa.int64())))))
case("nanosecond_timestamp", "ok")(
    lambda t: rewrite(part(t, "run"), lambda d: set_col(d, "started_at", d["started_at"].cast(pa.timestamp("ns", "UTC")))))

# invariants
case("negative_kv_bytes", "error", "negative")(lambda t: rewrite(part(t, "steps"), fill("kv_bytes", -1, pa.int64())))
case("negative_stored_tokens", "error", "negative")(lambda t: rewrite(part(t, "layers"), fill("stored_tokens", -5, pa.int64())))
case("duplicate_step", "error", "more than once")(lambda t: rewrite(part(t, "steps"), fill("step", 3, pa.int32())))
case("negative_step", "error", ">= 0")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "step", pa.array(np.arange(d.num_rows, dtype=np.int32) - 5))))
case("t_ns_backwards", "error", "backwards")(
    lambda t: rewrite(part(t, "steps"), lambda d: set_col(d, "t_ns", pa.array(np.arange(d.num_rows, 0, -1, dtype=np.int64)))))
case("layers_without_steps", "error", "no steps row")(lambda t: part(t, "steps").unlink())
case("stray_run_id", "error", "no row in the run table")(lambda t: rewrite(part(t, "layers"), fill("run_id", "ghost", pa.string())))
case("duplicate_run_rows", "error", "not unique")(
    lambda t: shutil.copy(part(t, "run"), t / "run" / "part-copy.parquet"))
case("null_run_id", "error", "no run_id")(lambda t: rewrite(part(t, "steps"), fill("run_id", None, pa.string())))
case("timestamp_far_future", "error", "1678-2262")(
    lambda t: rewrite(part(t, "run"), lambda d: set_col(d, "started_at", pa.array([2**62], pa.timestamp("us", "UTC")))))
case("timestamp_far_past", "error", "1678-2262")(
    lambda t: rewrite(part(t, "run"), lambda d: set_col(d, "started_at", pa.array([-(2**62)], pa.timestamp("us", "UTC")))))
case("missing_generations_row", "ok")(lambda t: part(t, "generations").unlink())

# JSON in the run table
case("model_config_infinity", "error", "model_config")(lambda t: run_edit(t, "model_config", '{"head_dim": Infinity}'))
case("model_config_nan", "error", "model_config")(lambda t: run_edit(t, "model_config", '{"num_hidden_layers": NaN}'))
case("model_config_not_json", "error", "model_config")(lambda t: run_edit(t, "model_config", "hello"))
case("model_config_array", "error", "model_config")(lambda t: run_edit(t, "model_config", "[1, 2]"))
case("model_config_string", "error", "model_config")(lambda t: run_edit(t, "model_config", '"a string"'))
case("model_config_deep", "error", "deeper")(lambda t: run_edit(t, "model_config", deep_json(100_000)))
case("model_config_huge", "error", "characters long")(
    lambda t: run_edit(t, "model_config", json.dumps({"x": "y" * (2 << 20)})))
case("labels_deep", "error", "labels")(lambda t: run_edit(t, "labels", '{"a":' * 50_000 + "1" + "}" * 50_000))
case("labels_not_json", "error", "labels")(lambda t: run_edit(t, "labels", "{not json"))
def _event(t: Path, detail: str) -> None:
    """An events part with one error event whose detail is `detail`."""
    from kvscope.schema.tables import TABLES
    from kvscope.trace.writer import write_part

    run_id = pq.read_table(part(t, "run"))["run_id"][0].as_py()
    rows = pa.table({"run_id": [run_id], "gen_id": pa.array([0], pa.int32()), "step": pa.array([1], pa.int32()),
                     "t_ns": [5], "kind": ["oom"], "detail": [detail]})
    from kvscope.trace.writer import conform

    write_part(t / "events", TABLES["events"], conform("events", rows))


case("event_detail_deep", "error", "events.detail")(lambda t: _event(t, '{"a":' * 100_000 + "1" + "}" * 100_000))
case("event_detail_not_object", "error", "events.detail")(lambda t: _event(t, "[1, 2, 3]"))
case("event_detail_ok", "ok")(lambda t: _event(t, json.dumps({"message": "CUDA out of memory", "bytes": 1 << 30})))
case("model_config_wrong_types", "ok")(
    lambda t: run_edit(t, "model_config", json.dumps({"head_dim": "64", "num_key_value_heads": [8], "layer_types": 3})))
# sizes past int64 once multiplied: the detectors treat them as absent (an OverflowError was exit 3)
case("model_config_huge_sizes", "ok")(
    lambda t: run_edit(t, "model_config", json.dumps({"head_dim": 1e300, "num_key_value_heads": 2 ** 62,
                                                      "sliding_window": 1e300, "num_kv_shared_layers": 2 ** 70})))
case("model_config_huge_per_layer", "ok")(
    lambda t: run_edit(t, "model_config", json.dumps({"num_attention_heads": 8, "head_dim": 64, "per_layer_config": {
        "0": {"head_dim": 1e300}, "1": {"num_key_value_heads": 2 ** 62}, "x": {}, "2": [1]}})))
case("model_config_huge_mla", "ok")(
    lambda t: run_edit(t, "model_config", json.dumps({"num_attention_heads": 2 ** 62, "qk_nope_head_dim": 1e300,
                                                      "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512})))

# hostile strings (read correctly, shown escaped)
case("escape_in_model_name", "ok")(lambda t: run_edit(t, "model_name", "\x1b[2J\x1b]0;owned\x07\x1b]8;;http://x\x1b\\y"))
case("markup_in_run_fields", "ok")(lambda t: [run_edit(t, c, "[/][bold]x[/bold][link=http://e]") for c in ("model_name", "host")] and None)
case("markup_in_layer_type", "ok")(lambda t: rewrite(part(t, "layers"), fill("layer_type", "[/]\x1b[31mred", pa.string())))
case("long_model_name", "ok")(lambda t: run_edit(t, "model_name", "m" * 3_000_000))
case("long_run_id_key", "error", "at most 1,024")(
    lambda t: [rewrite(p, fill("run_id", "r" * 5000, pa.string())) for table in ("run", "generations", "steps", "layers")
               for p in (t / table).glob("part-*.parquet")] and None)
case("compressible_huge_string", "error", "at most 16,777,216")(
    lambda t: rewrite(part(t, "run"), fill("host", "h" * (40 << 20), pa.string()), use_dictionary=False))


# part names
case("glob_star_part_name", "ok")(lambda t: part(t, "layers").rename(t / "layers" / "part-*.parquet"))
case("glob_bracket_part_name", "ok")(lambda t: part(t, "layers").rename(t / "layers" / "part-[0-9a-f]*.parquet"))
case("glob_question_part_name", "ok")(lambda t: part(t, "layers").rename(t / "layers" / "part-?.parquet"))
case("escape_in_part_name", "ok")(lambda t: part(t, "layers").rename(t / "layers" / "part-\x1b[2J\n.parquet"))
case("quote_in_part_name", "ok")(lambda t: part(t, "layers").rename(t / "layers" / "part-'); DROP VIEW layers; --.parquet"))
case("non_utf8_part_name", "error", "UTF-8")(
    lambda t: os.rename(part(t, "layers"), os.path.join(os.fsencode(t / "layers"), b"part-\xff\xfe.parquet")))
case("stray_tmp_part", "ok")(lambda t: (t / "layers" / ".part-dead.parquet.tmp").write_bytes(b"PAR1 half"))
case("non_part_files_ignored", "ok")(
    lambda t: [(t / "layers" / n).write_bytes(b"junk") for n in ("README", "x.parquet", "_SUCCESS")] and None)


def _interrupted(t: Path) -> None:
    """A compaction killed after the old parts were set aside, before the merged part was renamed."""
    names = [p.name for p in sorted((t / "layers").glob("part-*.parquet"))]
    for n in names[:1]:
        os.replace(t / "layers" / n, t / "layers" / f".{n}.aside")
    (t / "layers" / ".compact.json").write_text(json.dumps({"merged": "part-new.parquet",
                                                            "tmp": ".part-new.parquet.tmp", "replaces": names}))


case("interrupted_compaction", "ok", layers=BASE_LAYERS // 2)(_interrupted)


def _hostile_journal(t: Path) -> None:
    """A journal that would have `compact` delete a real part (as the 'temporary' file) and restore others."""
    names = [p.name for p in sorted((t / "layers").glob("part-*.parquet"))]
    (t / "layers" / ".compact.json").write_text(json.dumps({"merged": "part-none.parquet", "tmp": names[0],
                                                            "replaces": ["../../run/" + names[1]]}))


case("hostile_compaction_journal", "ok")(_hostile_journal)


# symlinks and permissions
def _symlink_part_out(t: Path) -> None:
    target = part(t, "layers")
    outside = t.parent / f"{t.name}-outside.parquet"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)


case("symlink_part_outside", "error", "outside the trace")(_symlink_part_out)
case("symlink_part_to_etc_passwd", "error", "outside the trace")(
    lambda t: (t / "layers" / "part-passwd.parquet").symlink_to("/etc/passwd"))
case("symlink_table_outside", "error", "outside the trace")(
    lambda t: (shutil.move(t / "events", t.parent / f"{t.name}-events") if (t / "events").exists() else
               (t.parent / f"{t.name}-events").mkdir(), (t / "events").symlink_to(t.parent / f"{t.name}-events")) and None)
case("symlink_loop_table", "error", "loop")(lambda t: (t / "events").symlink_to(t / "events"))
case("symlink_loop_part", "error", "loop")(lambda t: (t / "layers" / "part-loop.parquet").symlink_to(t / "layers" / "part-loop.parquet"))
case("dangling_symlink_part", "error", "broken symlink")(lambda t: (t / "layers" / "part-gone.parquet").symlink_to(t / "nowhere"))
case("symlink_part_inside", "ok")(
    lambda t: (shutil.move(part(t, "layers"), t / "kept.parquet.bin"),
               (t / "layers" / "part-link.parquet").symlink_to(t / "kept.parquet.bin")) and None)
case("unreadable_table_folder", "error", "permission denied", needs_non_root=True)(lambda t: os.chmod(t / "layers", 0))


def _many_parts(t: Path) -> None:
    data = pq.read_table(part(t, "events")) if (t / "events").exists() and list((t / "events").glob("*.parquet")) else None
    source = part(t, "generations")
    table = pq.read_table(source)
    for i in range(10_001):  # one more than MAX_PARTS in all (footers are never read: refused by count)
        (t / "generations" / f"part-{i:06d}.parquet").symlink_to(source)
    del data, table


case("too_many_parts", "error", "kvscope compact")(_many_parts)


def build_base(out: Path) -> Path:
    return build_synthetic_trace(out / "base", BASE_SPEC)


def build_corpus(out: Path, *, only: list[str] | None = None) -> list[tuple[Case, Path]]:
    """Write the base trace and every case under `out`; return (case, path) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not base.exists():
        build_base(out)
    built = []
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    for spec, mutate in CASES:
        if only is not None and spec.name not in only:
            continue
        if spec.needs_non_root and root:
            continue
        path = out / spec.name
        if path.exists():
            shutil.rmtree(path)
        shutil.copytree(base, path, symlinks=True)
        mutate(path)
        built.append((spec, path))
    return built


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    built = build_corpus(Path(argv[0]))
    for spec, path in built:
        print(f"{spec.expect:5s} {spec.name:36s} {path}")
    print(f"{len(built)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
