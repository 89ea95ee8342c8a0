"""Fleet benchmark: time and peak memory of a full analysis (every detector, the verdicts and the
fleet view) on DuckDB and on Spark local mode, as the fleet grows.

    .venv/bin/python scripts/bench_fleet.py --root /tmp/fleet --counts 200,2000 --layers 32 \
        --generations 4 --steps 391 --out docs/bench/fleet.json

builds the synthetic fleet (kvscope.trace.synth_fleet: planted leaks, fragmentation, superlinear
growth, odd layers, preallocation in a known set of traces; existing traces are reused), then for
each count and engine runs the analysis in a fresh process and records its wall time and the peak
resident memory of the process tree (the JVM included, sampled every 0.1 s), the number of
findings, and a digest of the findings (both engines must agree). Traces are not validated
(`--no-validate`: validation is per trace and costs the same on both engines; `--validate` times it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
if args["engine"] == "spark":
    from pyspark.sql import SparkSession
    (SparkSession.builder.master(args["master"]).config("spark.driver.memory", args["driver_memory"])
     .config("spark.ui.enabled", "false").config("spark.sql.ansi.enabled", "false")
     .config("spark.sql.session.timeZone", "UTC").config("spark.sql.runSQLOnFiles", "false")
     .config("spark.ui.showConsoleProgress", "false")
     .config("spark.sql.shuffle.partitions", str(args["partitions"])).getOrCreate().sparkContext.setLogLevel("ERROR"))
started = time.perf_counter()
from kvscope.analyzer.analyze import analyze
from kvscope.analyzer.engine import open_engine, rounded
from kvscope.analyzer.fleet import group_runs, run_meta
from kvscope.analyzer.run_facts import run_facts
paths = [str(Path(args["root"]) / f"trace-{i:05d}") for i in range(args["count"])]
kwargs = {"master": args["master"]} if args["engine"] == "spark" else {"threads": args["threads"]}
with open_engine(paths, engine=args["engine"], validate=args["validate"], **kwargs) as t:
    opened = time.perf_counter()
    findings = analyze(t)
    view = group_runs(("host",), run_meta(t, ("host",)), findings, run_facts(t))
    done = time.perf_counter()
    queries = len(t.queries)
digest = hashlib.sha256(json.dumps(rounded([f.to_dict() for f in findings] + [g.to_dict() for g in view.groups]),
                                   sort_keys=True).encode()).hexdigest()[:16]
print(json.dumps({"session_s": started - t0, "open_s": opened - started, "analyse_s": done - opened,
                  "findings": view.findings, "groups": len(view.groups), "queries": queries, "digest": digest}))
"""


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{args['engine']} at {args['count']} traces failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall_s": wall, "peak_rss_bytes": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--counts", default="200,2000")
    parser.add_argument("--engines", default="duckdb,spark")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--steps", type=int, default=391)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()

    from kvscope.trace.synth_fleet import FleetSize, build_fleet

    counts = [int(c) for c in a.counts.split(",")]
    size = FleetSize(layers=a.layers, generations=a.generations, steps=a.steps)
    t0 = time.perf_counter()
    build_fleet(a.root, max(counts), size)
    built = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in a.root.rglob("*.parquet"))
    print(f"fleet: {max(counts)} traces x {size.rows_per_trace:,} layers rows = "
          f"{max(counts) * size.rows_per_trace:,} rows, {disk / 2**30:.2f} GiB on disk ({built:.0f} s to build "
          "or check)", flush=True)
    results = []
    for count in counts:
        for engine in a.engines.split(","):
            row = run_child({"engine": engine, "root": str(a.root), "count": count, "master": a.master,
                             "driver_memory": a.driver_memory, "threads": a.threads, "validate": a.validate,
                             "partitions": max(os.cpu_count() or 1, 2)})
            row.update(engine=engine, traces=count, layers_rows=count * size.rows_per_trace)
            results.append(row)
            print(f"{engine:6} {count:5} traces {row['layers_rows']:>12,} rows: {row['wall_s']:7.1f} s wall "
                  f"(open {row['open_s']:.1f}, analyse {row['analyse_s']:.1f}), peak RSS "
                  f"{row['peak_rss_bytes'] / 2**30:.2f} GiB, {row['findings']} findings, {row['queries']} queries, "
                  f"digest {row['digest']}", flush=True)
    for count in counts:
        digests = {r["digest"] for r in results if r["traces"] == count}
        print(f"{count} traces: engines {'agree' if len(digests) == 1 else 'DISAGREE'}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "fleet": {"traces": max(counts), "rows_per_trace": size.rows_per_trace, "layers": size.layers,
                      "generations": size.generations, "steps": size.steps, "parquet_bytes": disk},
            "master": a.master, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
