"""The cost of online head statistics per sampled step, read from the traces' own step times.

    PYTHONPATH=src python3 scripts/bench_head_stats_cost.py --runs 3 --out cost.json [--device cuda]

Records the pythia-1.4b twin (bf16 on CUDA, 64-token prompt, 512 new tokens) alternately with and
without `head_stats_every=64`. Each step's duration is the difference of consecutive `steps.t_ns`.
Sampled steps (step % 64 == 0) also carry the recorder's 64-step flush, so the cost of the
statistics is the difference of differences: (median sampled-step time − median other-step time)
with statistics, minus the same without. Overhead in tokens/s = that extra time / (64 × the median
decode step) counts the sampled step alone; `overhead_fraction_of_tokens_per_s` compares whole
64-step cycles (one sampled step + 63 others, each run's medians), median over runs, so it also
counts any slowdown of unsampled steps while one run slowed by the shared host moves it little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from kvscope.recorder.session import record
from kvscope.trace.reader import open_trace
from kvscope.twins.build import build_twin
from kvscope.twins.spec import load_twin, shrink_config


def pythia_model_and_prompt(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The pythia-1.4b twin (bf16 on CUDA; shrunk, fp32 on the CPU) and a fixed 64-token prompt."""
    spec = load_twin("pythia-1.4b")
    if device == "cpu":
        spec = shrink_config(spec)
    model = build_twin(spec, dtype="bfloat16" if device == "cuda" else "float32", device=device)
    vocab = model.config.get_text_config().vocab_size
    return model, torch.randint(3, min(1000, vocab - 1), (1, 64), generator=torch.Generator().manual_seed(1)).to(device)


def step_times(path: Path, every: int) -> tuple[list[float], list[float]]:
    rows = sorted((r["step"], r["t_ns"]) for r in open_trace(path).read("steps", ["step", "t_ns"]).to_pylist())
    sampled, other = [], []
    for (s0, t0), (s1, t1) in zip(rows, rows[1:], strict=False):
        if s1 == s0 + 1 and s1 > 1:
            (sampled if s1 % every == 0 else other).append((t1 - t0) / 1e6)
    return sampled, other


def rows_written(path: Path) -> dict[str, int]:
    """head_stats rows, the steps they cover and error events of one recorded trace."""
    trace = open_trace(path)
    rows = trace.read("head_stats", ["step"]).column("step").to_pylist() if trace.num_rows("head_stats") else []
    events = trace.read("events", ["kind"]).column("kind").to_pylist() if trace.num_rows("events") else []
    return {"head_stats_rows": len(rows), "steps_with_stats": len(set(rows)),
            "error_events": sum(kind == "error" for kind in events)}


def phase_medians(path: Path, every: int, buckets: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 63)) -> list[float]:
    """Median step time (ms) per offset bucket after a sampled step: [0], [1], [2, 4), ... [32, 64)."""
    rows = sorted((r["step"], r["t_ns"]) for r in open_trace(path).read("steps", ["step", "t_ns"]).to_pylist())
    groups: list[list[float]] = [[] for _ in buckets]
    for (s0, t0), (s1, t1) in zip(rows, rows[1:], strict=False):
        if s1 == s0 + 1 and s1 > 1:
            offset = s1 % every
            index = max(i for i, b in enumerate(buckets) if offset >= b)
            groups[index].append((t1 - t0) / 1e6)
    return [round(statistics.median(g), 3) if g else float("nan") for g in groups]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed full-length recordings per variant")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    every = 64
    model, ids = pythia_model_and_prompt(args.device)
    data: dict[str, dict[str, list[float]]] = {"with": {"sampled": [], "other": []},
                                               "without": {"sampled": [], "other": []},
                                               "installed": {"sampled": [], "other": []}}
    phases: dict[str, list[list[float]]] = {}
    cycles: dict[str, list[float]] = {v: [] for v in data}  # per run: median sampled + (every - 1) x median other
    written: dict[str, list[dict[str, int]]] = {v: [] for v in data}  # per run: head_stats rows, error events
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
        with record(model, Path(tmp) / "warm", head_stats_every=every):
            model.generate(ids, max_new_tokens=every + 2, min_new_tokens=every + 2, do_sample=False)
        # "installed": the collector in place but sampling only the prefill, which isolates what
        # being installed costs an unsampled step (the wrapper, the mask registration, the pre-hook)
        variants = {"with": every, "without": 0, "installed": 1 << 30}
        # The H200 host ran the first full-length recording after a short warm-up slow at every
        # step, whatever its variant: one untimed full-length recording of each variant first.
        for w, (variant, n) in enumerate(list(variants.items()) * args.warmup_runs):
            with record(model, Path(tmp) / f"warm-{variant}-{w}", head_stats_every=n):
                model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        for r in range(args.runs * len(variants)):
            variant = list(variants)[r % len(variants)]
            path = Path(tmp) / f"{variant}-{r}"
            with record(model, path, head_stats_every=variants[variant]):
                model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            sampled, other = step_times(path, every)
            written[variant].append(rows_written(path))
            phases.setdefault(variant, []).append(phase_medians(path, every))
            cycles[variant].append(statistics.median(sampled) + (every - 1) * statistics.median(other))
            data[variant]["sampled"] += sampled
            data[variant]["other"] += other
    med = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in data.items()}
    extra_ms = (med["with"]["sampled"] - med["with"]["other"]) - (med["without"]["sampled"] - med["without"]["other"])
    step_ms = med["without"]["other"]
    # The host is shared: now and then a whole run is slow at every step (seen in plain runs too),
    # and pooling steps across runs lets one such run move the medians. The estimate compares
    # per-run 64-step cycle times, median over runs; runs over 1.5x the median cycle are listed.
    typical = statistics.median([c for cs in cycles.values() for c in cs])
    slow_runs = {v: [i for i, c in enumerate(cs) if c > 1.5 * typical] for v, cs in cycles.items()}

    doc = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "runs_per_variant": args.runs,
           "new_tokens": args.new, "median_ms": med, "extra_ms_per_sampled_step": round(extra_ms, 3),
           "median_decode_step_ms": round(step_ms, 3),
           # the sampled step's own cost only; the cycle estimate also counts slower unsampled steps
           "sampled_step_overhead_fraction": round(extra_ms / (every * step_ms), 5),
           "cycle_ms_per_run": {v: [round(c, 1) for c in cs] for v, cs in cycles.items()},
           "slow_runs": slow_runs,
           "overhead_fraction_of_tokens_per_s": round(statistics.median(cycles["with"])
                                                      / statistics.median(cycles["without"]) - 1, 5),
           "installed_overhead_fraction": round(statistics.median(cycles["installed"])
                                                / statistics.median(cycles["without"]) - 1, 5),
           "sampled_steps": {v: len(d["sampled"]) for v, d in data.items()},
           # with against without in the same round (rounds run the variants back to back)
           "cycle_ratio_per_round": [round(a / b - 1, 4) for a, b in zip(cycles["with"], cycles["without"], strict=False)],
           "written_per_run": written,
           # per run, the median step time at each offset after a sampled step (0 = the sampled step):
           # slow steps right after a sampled one point at queued GPU work, uniformly slow ones at a
           # per-step cost of being installed
           "median_ms_by_offset": phases}
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
