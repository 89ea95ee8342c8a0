"""How long a flush of the trace writer stalls a busy Python thread: writer thread vs writer process.

    PYTHONPATH=src python3 scripts/bench_writer_stall.py [--flushes 8] [--smoke]

CPU only. Builds real 64-step batches from the cache of the pythia-1.4b twin (shrunk, 24 layers),
then, for each writer, hands a batch over and flushes while the main thread runs a pure-Python loop
(like `generate`'s thread, it wants the GIL all the time). Reports the main thread's stall per flush
(the loop's gaps beyond its usual iteration time) next to the time the flush takes alone.
`--smoke`: 2 flushes of short batches (what `make test` runs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvscope.recorder.batch_writer import Steps
from kvscope.recorder.columns import HOOK_STEP_COLUMNS
from kvscope.recorder.measure import measure_cache
from kvscope.recorder.model_layout import model_layout
from kvscope.recorder.writer_process import WriterProcess
from kvscope.recorder.writer_thread import BackgroundWriter
from kvscope.trace.writer import TraceWriter
from kvscope.twins import load_twin
from kvscope.twins.build import build_twin
from kvscope.twins.spec import shrink_config


def busy_loop(seconds: float) -> tuple[float, float]:
    """Run tiny Python work units; return (total stall beyond 3x the median gap, longest gap), in ms."""
    gaps = []
    end = time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < end:
        total = 0
        for i in range(100):
            total += i
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    typical = statistics.median(gaps)
    return 1e3 * sum(g - typical for g in gaps if g > 3 * typical), 1e3 * max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flushes", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.flushes = 2
    torch.set_num_threads(1)
    model = build_twin(shrink_config(load_twin("pythia-1.4b")), dtype="bfloat16", device="cpu")
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    tokens = 4 if args.smoke else 64
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    cache, layout = out.past_key_values, model_layout(model)

    def batch(first: int) -> tuple[list[tuple], list[tuple]]:
        layers = [("bench", 0, first + i, 128 + i, measure_cache(cache, layout, 128)) for i in range(64)]
        values = {"run_id": "bench", "gen_id": 0, "seq_len": 128, "batch_size": 1, "allocated_bytes": 1,
                  "reserved_bytes": 2, "active_bytes": 3, "inactive_split_bytes": 4, "alloc_retries": 0,
                  "num_ooms": 0, "nvml_total_bytes": None, "recorder_ns": 1000}
        steps = [tuple({**values, "step": first + i, "t_ns": 1000 * i}[c] for c in HOOK_STEP_COLUMNS)
                 for i in range(64)]
        return steps, layers

    idle, _ = busy_loop(0.3)
    print(f"no writer: stall {idle:.2f} ms in 0.3 s")
    for name in ("thread", "process"):
        path = Path(tempfile.mkdtemp()) / "trace"
        writer = BackgroundWriter(TraceWriter(path)) if name == "thread" else WriterProcess(path)
        writer.flush(wait=True)
        stalls, longest, alone = [], [], []
        for index in range(args.flushes):
            steps, layers = batch(64 * index)
            handover = time.perf_counter()
            writer.send(Steps(steps, layers))
            writer.flush()
            handover = time.perf_counter() - handover
            stall, gap = busy_loop(0.3)
            stalls.append(stall + 1e3 * handover)
            longest.append(gap)
            start = time.perf_counter()
            steps, layers = batch(10_000 + 64 * index)
            writer.send(Steps(steps, layers))
            writer.flush(wait=True)
            alone.append(1e3 * (time.perf_counter() - start))
        writer.close(compact=False)
        print(f"writer {name:7s}: main-thread stall per flush (hand-over included) median "
              f"{statistics.median(stalls):6.2f} ms, longest gap {statistics.median(longest):5.2f} ms; "
              f"flush alone (waited) {statistics.median(alone):5.2f} ms")


if __name__ == "__main__":
    main()
