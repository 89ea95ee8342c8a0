"""Mutate shipped traces at random (seeded) and run every reading command over each: the outcome must
be an answer (exit 0 or 1) or a one-line error (exit 2), never an internal error, a traceback or a
terminal escape sequence. Each case copies one trace, changes one to three of its part files (a
value, a column nulled, dropped or cast to text, rows emptied or doubled, a JSON column's keys given
values of any JSON type) and runs inspect, analyze, report, export, diff and sql on it.

    python scripts/fuzz_values.py --seed 0 --count 400        # what docs/benchmarks.md measured
    python scripts/fuzz_values.py --seed 5089 --count 1 --keep /tmp/case   # leave a case on disk

tests/hardening/test_fuzz_values.py runs a fixed set of seeds in CI; scripts/fuzz_traces.py mutates
the bytes of part files instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# Shipped traces of every kind: CPU and GPU, OOM events, head statistics, static and MLA caches.
SOURCES = ("traces/pythia-1.4b", "traces/gpt-oss-20b-shrunk", "traces/lab/dead_head", "traces/lab/kept_caches",
           "traces/lab/interleaved_growth", "traces/lab-gpu/gemma-4-e4b/window_not_honoured",
           "traces/lab-gpu/deepseek-v2-lite/preallocated", "traces/lab-gpu/pythia-1.4b/oom_fraction",
           "traces/lab-gpu/gemma-4-31b/dead_head", "traces/lab-gpu/glm-4.7-flash/preallocated",
           "traces/lab-gpu/gpt-oss-120b/window_not_honoured", "traces/lab-gpu/gemma-4-e2b/oom_fraction")
EVIL_TEXT = ("\x1b[31mRED\x1b[0m", "</script><script>alert(1)</script>", '{"a":', "null", "", "x" * 100_000,
             "../../etc/passwd", "'; DROP TABLE run; --", "\u202egnp.exe", "[1,2,3]", "\x00\x01\x02", "NaN", "{}",
             '{"sliding_window": -5}', '{"num_hidden_layers": 1e308}', '{"layer_types": 5}')
EVIL_JSON: tuple[Any, ...] = (None, -1, 0, 10**30, 1e308, -1e308, "abc", "\x1b[2J", [], [1, -2], {}, {"a": {"b": 1}},
                              True, 2**63, 0.5, "-5")
JSON_COLUMNS = ("model_config", "options", "labels", "detail")


def _sources() -> list[Path]:
    return [ROOT / s for s in SOURCES if (ROOT / s / "run").is_dir()]


def _mutate_values(arr: pa.Array, rng: random.Random) -> pa.Array:
    t, n = arr.type, len(arr)
    if n == 0:
        return arr
    kind, idx, vals = rng.randrange(6), rng.randrange(n), arr.to_pylist()
    if pa.types.is_integer(t):
        wide = t.bit_width > 32
        choices = [-1, 0, -(2**62) if wide else -(2**31), 2**62 if wide else 2**31 - 1, None, 10**15 if wide else 10**9, 1]
        if kind == 0:
            vals = [rng.choice(choices) for _ in vals]
        elif kind == 1:
            vals[idx] = rng.choice(choices)
        elif kind == 2:
            rng.shuffle(vals)
        else:
            vals = [None] * n if kind == 3 else [rng.choice(choices)] * n
    elif pa.types.is_floating(t):
        floats = [float("nan"), float("inf"), float("-inf"), -1.0, None, 1e308, 0.0]
        vals = [rng.choice(floats) for _ in vals] if kind < 3 else [rng.choice(floats)] * n
    elif pa.types.is_string(t):
        if kind < 3:
            vals[idx] = rng.choice(EVIL_TEXT)
        else:
            vals = [rng.choice(EVIL_TEXT)] * n
    elif pa.types.is_boolean(t):
        vals = [rng.choice([True, False, None]) for _ in vals]
    elif pa.types.is_list(t):
        options: list[Any] = [[], None, [-1, -1], [0] * 9, [2**62, 1, 1, 1], [1]]
        vals = [rng.choice(options) if (kind < 2 or i == idx) else v for i, v in enumerate(vals)]
        if pa.types.is_string(t.value_type):
            vals = [None if v is None else [str(x) for x in v] for v in vals]
    elif pa.types.is_timestamp(t):
        vals = [None] * n
    try:
        return pa.array(vals, type=t)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return arr


def _mutate_json(raw: str, rng: random.Random) -> str:
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw

    def walk(node: Any, depth: int = 0) -> None:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return
        key = rng.choice(keys)
        if depth < 3 and isinstance(node[key], dict | list) and rng.random() < 0.5:
            walk(node[key], depth + 1)
        else:
            node[key] = rng.choice(EVIL_JSON)

    for _ in range(rng.randint(1, 4)):
        walk(obj)
    return json.dumps(obj)


def _mutate_table(table: pa.Table, rng: random.Random) -> tuple[pa.Table, str]:
    names = table.column_names
    json_cols = [c for c in JSON_COLUMNS if c in names]
    if json_cols and rng.random() < 0.6:
        col = rng.choice(json_cols)
        vals = [_mutate_json(v, rng) if isinstance(v, str) else v for v in table[col].to_pylist()]
        i = names.index(col)
        return table.set_column(i, table.schema.field(i), pa.array(vals, pa.string())), f"json {col}"
    op, col = rng.randrange(10), rng.choice(names)
    if op == 0:
        return table.drop_columns([col]), f"drop {col}"
    if op == 1:
        return table.slice(0, 0), "no rows"
    if op == 2:
        return pa.concat_tables([table, table]), "rows doubled"
    arr = table[col].combine_chunks()
    if op == 3:
        try:
            return table.set_column(names.index(col), col, pc.cast(arr, pa.string())), f"{col} as text"
        except pa.ArrowException:
            return table, "unchanged"
    return table.set_column(names.index(col), pa.field(col, arr.type), _mutate_values(arr, rng)), f"values of {col}"


def build_case(seed: int, root: Path) -> tuple[Path, Path, list[str]]:
    """Copy one shipped trace into `root` and mutate it; (case, source, what was changed)."""
    rng = random.Random(seed)
    source = rng.choice(_sources())
    case = root / f"case-{seed}"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(source, case)
    tables = sorted(d for d in case.iterdir() if d.is_dir())
    weighted = tables + [t for t in tables if t.name in ("run", "events")] * 2  # the JSON lives there
    what = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        folder = rng.choice(weighted)
        part = rng.choice(sorted(folder.glob("*.parquet")))
        mutated, change = _mutate_table(pq.read_table(part), rng)
        pq.write_table(mutated, part)
        what.append(f"{folder.name}: {change}")
    return case, source, what


def _run(main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 99
        except BaseException:  # noqa: BLE001 - what the fuzzer looks for
            code = 98
            err.write(traceback.format_exc())
    return code, out.getvalue(), err.getvalue()


def check_case(case: Path, source: Path, scratch: Path) -> list[str]:
    """Every command over one case; the problems found (empty: every outcome acceptable)."""
    from kvscope.cli.main import main

    commands = [["inspect", str(case)], ["inspect", str(case), "--format", "json"], ["analyze", str(case)],
                ["analyze", str(case), "--format", "json"], ["report", str(case), "-o", str(scratch / "r.html")],
                ["export", str(case), "--perfetto", "-o", str(scratch / "e.json")], ["export", str(case), "--prometheus"],
                ["diff", str(source), str(case)], ["sql", str(case), "SELECT count(*) FROM steps"]]
    problems = []
    for args in commands:
        code, out, err = _run(main, args)
        problem = None
        if code not in (0, 1, 2):
            problem = f"exit {code}"
        elif "internal error" in err or "Traceback" in err:
            problem = "internal error"
        elif "\x1b" in out or "\x1b" in err:
            problem = "escape sequence on the terminal"
        elif code == 2 and len(err.strip().splitlines()) > 1 and args[0] != "inspect":
            problem = "an error of more than one line"
        if problem:
            problems.append(f"{args[0]} {' '.join(args[2:3])}: {problem}: {err.strip()[-400:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="leave the cases in this folder")
    args = parser.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seed, args.seed + args.count):
            case, source, what = build_case(seed, root)
            for problem in check_case(case, source, Path(tmp)):
                bad += 1
                print(f"seed {seed} ({source.relative_to(ROOT)}; {'; '.join(what)}): {problem}", flush=True)
            if args.keep is None:
                shutil.rmtree(case)
    print(f"{args.count} cases, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
