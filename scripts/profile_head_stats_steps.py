"""Where an installed head-statistics collector spends time on unsampled decode steps.

    PYTHONPATH=src python3 scripts/profile_head_stats_steps.py --out profile.json [--device cuda]

Per-step wall times (a stopping criterion stamps each step) of the pythia-1.4b twin (bf16 on
CUDA, 64-token prompt) in these variants, interleaved over rounds:
plain `generate`; the collector alone installed but sampling only the prefill (`installed`);
the collector sampling every 64 steps (`every64`); the same with `observe` replaced by a no-op
(`every64-noop`, the wrapper and hooks only); the recorder without and with `head_stats_every=64`.
Then a torch.profiler table of 24 decode steps for `plain`, `installed` and `recorder-every64`:
the ops whose count or self time differ say what the collector adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_head_stats_cost import pythia_model_and_prompt
from transformers import StoppingCriteria, StoppingCriteriaList

from kvscope.kernels.online import HeadStatsCollector
from kvscope.recorder.session import record


class StepClock(StoppingCriteria):
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def step_ms(times: list[float], every: int = 64) -> dict[str, float]:
    """Median ms of steps at offset 0 (sampled), 1, 2-7 and 8-63 after a sampled step."""
    groups: dict[str, list[float]] = {"0": [], "1": [], "2-7": [], "8-63": []}
    for i in range(1, len(times)):
        step = i  # times[i] closes decode step i (times[0] closes the prefill)
        d = (times[i] - times[i - 1]) * 1e3
        off = step % every
        key = "0" if off == 0 else "1" if off == 1 else "2-7" if off < 8 else "8-63"
        groups[key].append(d)
    return {k: round(statistics.median(v), 3) for k, v in groups.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, ids = pythia_model_and_prompt(args.device)
    tmp = Path(tempfile.mkdtemp())

    def gen(n: int) -> list[float]:
        clock = StepClock()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
        return clock.times

    def plain(n: int) -> list[float]:
        return gen(n)

    def collector(every: int, noop: bool = False) -> Any:
        def run(n: int) -> list[float]:
            c = HeadStatsCollector(every).install(model)
            if noop:
                c.observe = lambda *a, **k: None  # type: ignore[method-assign]
            try:
                return gen(n)
            finally:
                c.uninstall()
        return run

    def recorded(every: int) -> Any:
        def run(n: int) -> list[float]:
            with record(model, tmp / f"r{every}-{time.time_ns()}", head_stats_every=every):
                return gen(n)
        return run

    variants = {"plain": plain, "installed": collector(1 << 30), "every64": collector(64),
                "every64-noop": collector(64, noop=True), "recorder": recorded(0), "recorder-every64": recorded(64)}
    with torch.no_grad():
        for fn in variants.values():  # warm-up, compiles every kernel shape once
            fn(70)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results[name].append(step_ms(fn(args.new)))
                print(name, results[name][-1], flush=True)
        tables: dict[str, str] = {}
        for name in ("plain", "installed", "recorder-every64"):
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with profile(activities=activities) as prof:
                variants[name](24)
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            print(f"== {name}\n{tables[name]}", flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                                    "new_tokens": args.new, "median_ms_by_offset": results, "profiles": tables},
                                   indent=1))


if __name__ == "__main__":
    main()
