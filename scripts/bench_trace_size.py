"""Trace size on disk: bytes per `layers` row for a 36-layer, 4096-step generation.

Three ways the same generation reaches disk (gpt-oss-120b geometry: 1:1 sliding W=128 / full,
8 kv heads x 64, bf16):
  synthetic   the synthetic builder's one sorted part,
  recorder    rows appended per step, flushed every 64 steps, compacted at close (the recorder's path),
  uncompacted the same 64 flushed parts without compaction (what a killed process leaves).
Usage: python scripts/bench_trace_size.py [WORKDIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from kvscope.schema import TraceMetadata
from kvscope.trace import TraceWriter, open_trace
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

LAYERS, STEPS, WINDOW, HEADS, HEAD_DIM, PROMPT = 36, 4096, 128, 8, 64, 1
TYPES = ["sliding_attention", "full_attention"] * (LAYERS // 2)


def via_writer(path: Path, compact: bool) -> None:
    meta = TraceMetadata(model_name="gpt-oss-120b geometry", model_type="gpt_oss", num_layers=LAYERS,
                         layer_types=TYPES, dtype="bfloat16", run_id="size-bench")
    writer = TraceWriter(path)
    writer.append("run", meta.to_row())
    per_token = HEADS * HEAD_DIM * 2
    for step in range(STEPS):
        seq = PROMPT + step
        total = 0
        for layer, kind in enumerate(TYPES):
            stored = min(seq, WINDOW - 1) if kind == "sliding_attention" else seq
            nbytes = stored * per_token
            total += 2 * nbytes
            writer.append("layers", {
                "run_id": meta.run_id, "gen_id": 0, "step": step, "layer": layer, "layer_type": kind,
                "cache_layer_class": "DynamicSlidingWindowLayer" if kind == "sliding_attention" else "DynamicLayer",
                "k_shape": [1, HEADS, stored, HEAD_DIM], "v_shape": [1, HEADS, stored, HEAD_DIM],
                "k_dtype": "bfloat16", "v_dtype": "bfloat16", "k_bytes": nbytes, "v_bytes": nbytes,
                "kv_bytes": 2 * nbytes, "aliased": False, "stored_tokens": stored, "capacity_tokens": None,
            })
        writer.append("steps", {"run_id": meta.run_id, "gen_id": 0, "step": step, "t_ns": 22_000_000 * (step + 1),
                                "seq_len": seq, "batch_size": 1, "kv_bytes": total})
        if (step + 1) % 64 == 0:
            writer.flush()
    writer.close(compact=compact)


def main() -> int:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kvscope-size-"))
    shutil.rmtree(work, ignore_errors=True)
    spec = SynthSpec(num_layers=LAYERS, layer_types=tuple(TYPES), sliding_window=WINDOW, num_kv_heads=HEADS,
                     head_dim=HEAD_DIM, steps=STEPS, prompt_tokens=PROMPT)
    builders = {
        "synthetic": lambda p: build_synthetic_trace(p, spec),
        "recorder": lambda p: via_writer(p, compact=True),
        "uncompacted": lambda p: via_writer(p, compact=False),
    }
    print(f"{'path':<12} {'layers rows':>12} {'parts':>6} {'bytes':>10} {'bytes/row':>10} {'write s':>8}")
    for name, build in builders.items():
        started = time.perf_counter()
        build(work / name)
        seconds = time.perf_counter() - started
        trace = open_trace(work / name)
        rows, size = trace.num_rows("layers"), trace.size_bytes("layers")
        print(f"{name:<12} {rows:>12,} {len(trace.parts['layers']):>6} {size:>10,} {size / rows:>10.3f} {seconds:>8.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
