"""Where the recorder's per-step hook spends its time inside a real generate (GPU host).

    PYTHONPATH=src python3 scripts/profile_recorder_hook.py [--twin pythia-1.4b] [--new-tokens 256]

Wraps the parts the hook calls (cache lookup, fact capture, allocator stats, NVML) with timers and
prints the median µs of each per step, next to the whole hook's `recorder_ns`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

import kvscope
from kvscope.recorder import measure as measure_module
from kvscope.recorder import steps as steps_module
from kvscope.recorder import telemetry
from kvscope.twins import load_twin
from kvscope.twins.build import build_twin

TIMES: dict[str, list[int]] = defaultdict(list)
GC: dict[str, list[int]] = defaultdict(list)  # "gen N" -> durations of the collections of generation N
_gc_start = [0]


def _gc_callback(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter_ns()
    else:
        GC[f"gen {info['generation']}"].append(time.perf_counter_ns() - _gc_start[0])


def gc_report(label: str) -> None:
    parts = [f"{name}: {len(v)} collections, {sum(v) / 1e3:.0f} µs" for name, v in sorted(GC.items())]
    print(f"   gc during {label}: " + ("; ".join(parts) or "none"))


def timed(name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter_ns() - start)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--twin", default="pythia-1.4b")
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    model = build_twin(load_twin(args.twin), dtype="bfloat16", device="cuda")
    ids = torch.randint(3, 50000, (1, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    model.generate(ids, **kwargs)  # warm-up
    gc.callbacks.append(_gc_callback)
    for _ in range(2):
        GC.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        print(f"plain: {args.new_tokens / elapsed:.1f} tokens/s, step {1e3 * elapsed / args.new_tokens:.2f} ms")
        gc_report("plain generate")
    steps_module.measure_cache = timed("measure_cache", steps_module.measure_cache)
    measure_module._capture_fast = timed("_capture_fast (plan + capture)", measure_module._capture_fast)
    measure_module._plan = timed("_plan", measure_module._plan)
    steps_module.StepRecorder.on_forward = timed("on_forward (whole hook)", steps_module.StepRecorder.on_forward)
    steps_module.cache_from_output = timed("cache_from_output", steps_module.cache_from_output)
    steps_module.batch_and_tokens = timed("batch_and_tokens", steps_module.batch_and_tokens)
    telemetry.AllocatorProbe.read = timed("allocator_read", telemetry.AllocatorProbe.read)
    steps_module.StepRecorder._hand_over = timed("hand_over (every 64 steps)", steps_module.StepRecorder._hand_over)
    for label, gc_on in (("gc on", True), ("gc frozen", False)):
        TIMES.clear()
        GC.clear()
        trace = Path(tempfile.mkdtemp())
        if not gc_on:
            gc.collect()
            gc.disable()
        with kvscope.record(model, trace, native=True) as rec:
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            del out
            rec.settle()
        gc.enable()
        ns = [v for p in (trace / "steps").glob("part-*.parquet") for v in pq.read_table(p)["recorder_ns"].to_pylist()]
        print(f"{label}: {args.new_tokens / elapsed:.1f} tokens/s, step {1e3 * elapsed / args.new_tokens:.2f} ms, "
              f"recorder_ns median {statistics.median(ns) / 1e3:.1f} µs")
        gc_report("recorded generate")
        for name, values in TIMES.items():
            print(f"   {name:18s} median {statistics.median(values) / 1e3:7.1f} µs  max {max(values) / 1e3:8.1f} µs")


if __name__ == "__main__":
    main()
