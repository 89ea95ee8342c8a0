"""A small trace that expands to many rows (dictionary/RLE): the resource-exhaustion benchmark.

    python scripts/make_rle_bomb.py OUT [--rows 100000000]

Builds the synthetic base trace and replaces its layers table with ROWS identical rows written in
row groups of 1,048,576 (a few MB on disk for 100 M rows). Used to measure that `kvscope inspect`
checks it in bounded memory (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.schema.tables import TABLES
from kvscope.trace.synth import SynthSpec, build_synthetic_trace
from kvscope.trace.writer import write_options

GROUP = 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=100_000_000)
    args = parser.parse_args(argv)
    trace = build_synthetic_trace(args.out, SynthSpec(num_layers=2, generations=1, steps=4))
    layers = trace / "layers"
    old = sorted(layers.glob("part-*.parquet"))
    first = pq.read_table(old[0]).slice(0, 1)
    block = pa.concat_tables([first] * GROUP).combine_chunks()
    spec = TABLES["layers"]
    options = write_options(spec, block.schema)
    target = layers / "part-rlebomb0000.parquet"
    with pq.ParquetWriter(target, block.schema, **options) as writer:
        left = args.rows
        while left > 0:
            writer.write_table(block.slice(0, min(GROUP, left)))
            left -= GROUP
    for p in old:
        p.unlink()
    print(f"{target}: {args.rows:,} rows, {target.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
