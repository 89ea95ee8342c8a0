"""Benchmark `kvscope analyze` over a synthetic trace of >= 10 million `layers` rows.

Builds (or reuses) a gpt-oss-120b-geometry trace, many generations of 36 layers, then measures:
- the wall time and peak RSS of the whole `kvscope analyze` process (start-up included), every
  detector, JSON output to /dev/null, via /usr/bin/time -v (else getrusage of the child);
- one reference DuckDB query over the same files: per (run, generation, layer) the R² of a linear
  and of a quadratic fit of kv_bytes on stored_tokens in a single GROUP BY (regr_r2, and the
  normal-equation sums for the quadratic) — the least work a growth detector can do.
Targets: analyze <= 10x the reference query, peak RSS <= 2 GiB.

    python scripts/bench_analyzer.py [--trace DIR] [--generations 136] [--steps 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REFERENCE_QUERY = """
WITH s AS (
  SELECT run_id, gen_id, layer, count(*) AS n,
    regr_r2(kv_bytes::DOUBLE, stored_tokens::DOUBLE) AS r2_lin,
    sum(x) AS sx, sum(x * x) AS sxx, sum(x * x * x) AS sxxx, sum(x * x * x * x) AS sxxxx,
    sum(y) AS sy, sum(x * y) AS sxy, sum(x * x * y) AS sxxy, sum(y * y) AS syy
  FROM (SELECT run_id, gen_id, layer, stored_tokens::DOUBLE AS x, kv_bytes::DOUBLE AS y, kv_bytes, stored_tokens
        FROM read_parquet({files}))
  GROUP BY run_id, gen_id, layer
), c AS (  -- centred normal equations of y = a + b x + c x^2
  SELECT *, sxx - sx * sx / n AS vxx, sxxx - sx * sxx / n AS vxq, sxxxx - sxx * sxx / n AS vqq,
    sxy - sx * sy / n AS cxy, sxxy - sxx * sy / n AS cqy, syy - sy * sy / n AS vyy FROM s
)
SELECT run_id, gen_id, layer, r2_lin,
  CASE WHEN vyy > 0 AND vxx * vqq - vxq * vxq > 0 THEN
    ((cxy * vqq - cqy * vxq) * cxy + (cqy * vxx - cxy * vxq) * cqy) / (vxx * vqq - vxq * vxq) / vyy END AS r2_quad
FROM c
"""


def build(trace: Path, generations: int, steps: int) -> int:
    from kvscope.trace.synth import SynthSpec, build_synthetic_trace

    spec = SynthSpec(num_layers=36, layer_types=("sliding_attention", "full_attention") * 18, sliding_window=128,
                     num_kv_heads=8, head_dim=64, dtype="bfloat16", prompt_tokens=64, steps=steps,
                     generations=generations, model_name="gpt-oss-120b (synthetic)", model_type="gpt_oss",
                     run_id="bench")
    if not (trace / "run").is_dir():
        if trace.exists():
            shutil.rmtree(trace)
        started = time.perf_counter()
        build_synthetic_trace(trace, spec)
        print(f"built {trace} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (trace / "layers").glob("part-*.parquet"))


def time_analyze(trace: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS bytes and number of findings of one `kvscope analyze` process."""
    kvscope = [sys.executable, "-m", "kvscope", "analyze", str(trace), "--format", "json"]
    use_time = Path("/usr/bin/time").exists()
    cmd = ["/usr/bin/time", "-v", *kvscope] if use_time else kvscope
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"kvscope analyze failed ({result.returncode}): {result.stderr[-2000:]}")
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
        rss = int(match.group(1)) * 1024 if match else 0
    else:
        rss = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024
    json_start = result.stdout.find("[")
    return wall, rss, len(json.loads(result.stdout[json_start:]))


def reference_rows(trace: Path) -> tuple[float, list[tuple]]:
    """Seconds and rows (run_id, gen_id, layer, r2_lin, r2_quad) of the reference query, fresh connection."""
    import duckdb

    files = "[" + ", ".join(f"'{p}'" for p in sorted((trace / "layers").glob("part-*.parquet"))) + "]"
    con = duckdb.connect()
    con.execute(f"SET threads = {os.cpu_count() or 1}").fetchall()
    started = time.perf_counter()
    rows = con.execute(REFERENCE_QUERY.format(files=files)).fetchall()
    return time.perf_counter() - started, rows


def time_reference(trace: Path) -> tuple[float, int]:
    seconds, rows = reference_rows(trace)
    return seconds, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=Path(".bench/analyzer-10M"))
    parser.add_argument("--generations", type=int, default=136)
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = build(args.trace, args.generations, args.steps)
    refs, runs = [], []
    for _ in range(args.repeat):  # interleaved, medians quoted
        refs.append(time_reference(args.trace)[0])
        runs.append(time_analyze(args.trace))
    ref = statistics.median(refs)
    wall = statistics.median(r[0] for r in runs)
    rss = max(r[1] for r in runs)
    result = {
        "layers_rows": rows, "cores": os.cpu_count(), "repeat": args.repeat,
        "reference_query_s": round(ref, 3), "analyze_wall_s": round(wall, 3), "ratio": round(wall / ref, 2),
        "analyze_peak_rss_mib": round(rss / 2**20, 1), "findings": runs[0][2],
        "reference_runs_s": [round(x, 3) for x in refs], "analyze_runs_s": [round(r[0], 3) for r in runs],
        "targets_met": wall / ref <= 10 and rss <= 2 * 2**30,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
