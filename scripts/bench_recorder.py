"""Recorder overhead on a GPU: tokens/s of generate with and without the recorder, interleaved.

    PYTHONPATH=src python3 scripts/bench_recorder.py --rounds 5 --out bench-results.json

Builds the pythia-1.4b twin (bf16, random weights), a 64-token prompt, 512 new tokens (min = max),
and runs rounds of three variants in rotating order: plain generate, generate inside
`kvscope.record` (telemetry every step, no samples), and the same with KV samples every 64 steps.
Reports, per variant: the median of tokens/s over rounds; the median of per-round ratios to the
plain run of the same round (pairs cancel slow drifts of the host), with a bootstrap 95% interval;
the median decode-step time over all steps of all rounds (a logits processor stamps each step in
every variant, so its ~1 µs cost is common to all); and the recorder's own per-step time
(`recorder_ns` from the traces).

`--variants plain recorder` runs only those; `--cpus 2-7` pins the process (and the threads and
processes it starts) to those cores; `--max-minutes` stops starting rounds after that long. The
JSON is rewritten after every round, so a run cut short still leaves its results. `--smoke` runs
one short round of a few variants on the CPU with a 2-layer model (what `make test` runs, so a change
that breaks this script fails there). It uses the recorder's supported seams only: `rec.pause()` /
`rec.resume()` and `rec.helper_pids`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

import kvscope
from kvscope.twins import load_twin
from kvscope.twins.build import build_twin

VARIANTS = ("plain", "recorder", "recorder+samples64")
# Attribution: the recorder without NVML readings, and the writer on a thread of this process
# instead of its own process (the fallback).
# "recorder-ab" switches the hook on and off in alternate blocks of AB_BLOCK decode steps within one
# generation: adjacent blocks are a fraction of a second apart, so host noise that drifts over
# seconds (it does on the lent H100 hosts) cancels in the per-step overhead, which pairs of whole
# runs cannot resolve. Its trace has gaps: a measurement only.
# "-python" variants measure in Python instead of the C++ fast path (`native=False`); the others
# use the fast path, built before the first round.
# "poller-ab" keeps the hook off and stops/continues the writer process, whose thread polls NVML
# (SIGSTOP/SIGCONT), in alternate blocks: the poller's own cost to the decode loop, which
# "recorder-ab" (poller always on) cannot see. "poller5-ab" polls every 5 ms instead of 1; "poller01-ab" every 0.1 ms, i.e. as fast as NVML
# answers: an amplifier (a cost too small to see at 1 kHz grows with the rate). "recorder-full-ab"
# toggles hook and poller. "recorder-all-ab" toggles both too, and flushes every 60 recorded steps
# instead of 64, so each flush falls inside a hook-on block (step 4 of the 8th block of 8) and the
# writer process's work that follows it is booked to "on", not to the next "off" block.
# "recorder-all5-ab" is "recorder-all-ab" with the NVML poller at 5 ms instead of 1 ms.
# "recorder-all-python-ab" is "recorder-all-ab" measured in Python (`native=False`): what a fresh
# install records with, since native="auto" never compiles.
OPTIONAL_VARIANTS = ("recorder-nvml-off", "recorder-thread-writer", "recorder-ab",
                     "recorder-python", "recorder-python-ab", "poller-ab", "poller5-ab", "poller01-ab",
                     "recorder-full-ab", "recorder-all-ab", "recorder-all5-ab", "recorder-all-python-ab")
ALL_AB_VARIANTS = ("recorder-all-ab", "recorder-all5-ab", "recorder-all-python-ab")  # hook, poller and flushes
AB_BLOCK = 32
AB_RATIOS: dict[str, list[float]] = {}  # block ratios of every run of each "-ab" variant
AB_PHASES: dict[str, list[int]] = {}  # per run of each "-ab" variant: 0 if its first block was "on", 1 if "off"
USE_NATIVE = True  # False with --smoke: no C++ build
CHILD_CPUS: set[int] | None = None  # --children-cpus: where the writer and NVML processes may run


class StepClock:
    """A logits processor that stamps the host clock at every decode step (same cost in every variant)."""

    def __init__(self, block: int = 32, calls: int = 0, phase: int = 0) -> None:
        self.block = block  # steps per on/off block ("-ab" variants)
        self.phase = phase  # 0: the first block is "on"; 1: it is "off" (--ab-alternate)
        self.calls = calls  # calls in the generation: the poller is continued at the last one
        self.stamps: list[int] = []
        self.toggle: Any = None  # a Recording paused and resumed per block ("recorder-ab")
        self.hook_off = False  # keep the hook off in every block ("poller-ab")
        self.pause_pid: int | None = None  # a process stopped in off blocks, continued in on blocks
        self.active: list[bool] = []  # per interval: whether the hook ran in that step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter_ns())
        if self.toggle is not None:
            on = ((len(self.stamps) - 1) // self.block + self.phase) % 2 == 0
            if on and not self.hook_off:  # for the next forward pass (the interval starting now)
                self.toggle.resume()
            else:
                self.toggle.pause()
            if self.pause_pid is not None and len(self.stamps) == self.calls:
                # generate ends after this call and hands its last rows to the writer: let it run
                os.kill(self.pause_pid, signal.SIGCONT)
            elif self.pause_pid is not None and (not self.active or self.active[-1] != on):
                os.kill(self.pause_pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.active.append(on)
        return scores

    def block_ratios(self) -> list[float]:
        """Median step time of each hook-on block over the next hook-off block, minus 1."""
        intervals = self.intervals_ms()
        blocks: list[tuple[bool, list[float]]] = []
        for interval, on in zip(intervals, self.active, strict=False):
            if not blocks or blocks[-1][0] != on:
                blocks.append((on, []))
            blocks[-1][1].append(interval)
        return [statistics.median(a) / statistics.median(b) - 1
                for (on_a, a), (on_b, b) in zip(blocks, blocks[1:], strict=False)
                if on_a and not on_b and len(a) >= self.block // 2 and len(b) >= self.block // 2]

    def intervals_ms(self) -> list[float]:
        """Decode-step times (the prefill step, before the first stamp, is excluded)."""
        return [(b - a) / 1e6 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def recorder_ns(trace: Path) -> list[int]:
    return [v for part in sorted((trace / "steps").glob("part-*.parquet"))
            for v in pq.read_table(part, columns=["recorder_ns"])["recorder_ns"].to_pylist()]


def poll_interval_ms(variant: str) -> float:
    return 5.0 if "poller5" in variant or "all5" in variant else 0.1 if "poller01" in variant else 1.0


def pin_children(rec: Any, cpus: set[int]) -> None:
    """Move the recording's writer process (and its NVML polling thread) onto `cpus` (e.g. away from
    the core that runs generate and its hyperthread sibling)."""
    for pid in rec.helper_pids:
        os.sched_setaffinity(pid, cpus)


def cpu_siblings() -> dict[int, str]:
    """Each usable CPU's hyperthread siblings, as Linux lists them (empty where it does not)."""
    siblings = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        siblings[cpu] = path.read_text().strip() if path.exists() else ""
    return siblings


def run_once(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, variant: str,
             workdir: Path, phase: int = 0) -> tuple[float, list[int], list[float]]:
    from transformers import LogitsProcessorList

    clock = StepClock(AB_BLOCK, new_tokens, phase)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([clock]))
    gc.collect()  # every variant starts from the same collector state
    if variant == "plain":
        _sync()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync()
        return time.perf_counter() - start, [], clock.intervals_ms()
    trace = Path(tempfile.mkdtemp(dir=workdir))
    with kvscope.record(model, trace, sample_kv_every=64 if "samples" in variant else 0,
                        nvml=False if "nvml-off" in variant else "auto",
                        writer="thread" if "thread-writer" in variant else "auto",
                        native="python" not in variant and USE_NATIVE,
                        nvml_interval_ms=poll_interval_ms(variant),
                        flush_every=60 if variant in ALL_AB_VARIANTS else 64) as rec:
        rec.wait_ready(120)  # steady state: the writer process is running (a block never waits for it)
        if variant.endswith("-ab"):
            clock.toggle = rec
        if variant.startswith("poller"):
            clock.hook_off = True
        if (variant.startswith("poller") or variant == "recorder-full-ab" or variant in ALL_AB_VARIANTS) \
                and rec.helper_pids:
            clock.pause_pid = rec.helper_pids[0]
        if CHILD_CPUS is not None:
            pin_children(rec, CHILD_CPUS)
        _sync()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        _sync()
        elapsed = time.perf_counter() - start
        if clock.pause_pid is not None:
            os.kill(clock.pause_pid, signal.SIGCONT)  # the poller must answer when the recording stops
        del out
        rec.settle()
    per_step = recorder_ns(trace)
    shutil.rmtree(trace)
    if variant.endswith("-ab"):
        AB_RATIOS.setdefault(variant, []).extend(clock.block_ratios())
        AB_PHASES.setdefault(variant, []).append(phase)
    return elapsed, per_step, clock.intervals_ms()


def bootstrap_interval(values: list[float], *, resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of the median of `values`."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def parse_cpus(text: str) -> set[int]:
    """'2-7,10' -> {2, 3, 4, 5, 6, 7, 10}."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def component_costs(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int = 500) -> dict:
    """Median µs of each part of the per-step hook, on the cache of a finished generation."""
    from kvscope.recorder.allocator import AllocatorProbe
    from kvscope.recorder.layer_rows import expand_steps
    from kvscope.recorder.measure import measure_cache
    from kvscope.recorder.model_layout import model_layout
    from kvscope.recorder.nvml import NvmlProbe

    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones_like(ids), return_dict_in_generate=True)
    cache = out.past_key_values
    layout = model_layout(model)
    step = measure_cache(cache, layout, ids.shape[-1] + new_tokens)
    batch = [("bench", 0, i, ids.shape[-1] + i, step) for i in range(64)]
    from kvscope.recorder import native as native_fast_path

    native = native_fast_path.build()
    allocator = AllocatorProbe(layout.cuda_devices)
    native_allocator = AllocatorProbe(layout.cuda_devices, native)
    nvml = NvmlProbe(layout.cuda_devices)
    parts = {
        "allocator_stats_call": allocator.read,
        "torch_cuda_memory_stats_flattened": (lambda: torch.cuda.memory_stats()) if torch.cuda.is_available() else None,
        "nvml_used": nvml.used,
        # the hook's own share: raw facts per layer (rows and totals are expanded later, per batch)
        "measure_cache_all_layers": lambda: measure_cache(cache, layout, ids.shape[-1] + new_tokens),
        # the same two reads through the C++ fast path
        "native_allocator_stats": native_allocator.read,
        "native_measure_cache_all_layers": lambda: measure_cache(cache, layout, ids.shape[-1] + new_tokens,
                                                                 native=native),
        # the writer thread's share, per batch of 64 steps (divide by 64 for a per-step figure)
        "expand_64_step_batch": lambda: expand_steps(batch),
    }
    costs = {}
    for name, fn in parts.items():
        if fn is None:
            continue
        for _ in range(50):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - start)
        costs[name] = statistics.median(times) / 1000
    return costs


def summarise(args: argparse.Namespace, variants: tuple[str, ...], costs: dict, results: dict[str, list[float]],
              per_step: dict[str, list[int]], step_ms: dict[str, list[float]],
              round_step_ms: dict[str, list[float]]) -> dict:
    """Estimators per variant against plain, with bootstrap intervals of the paired medians."""
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    summary: dict = {"device": device_name, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "twin": args.twin,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "rounds": len(next(iter(results.values()))), "cpus": sorted(os.sched_getaffinity(0)),
                     "tokens_per_s": results, "component_us": costs, "round_median_step_ms": round_step_ms,
                     "variants": {}}
    if "plain" not in results:  # --no-plain: only the on/off blocks of "-ab" variants are estimated
        return summary
    base = statistics.median(results["plain"])
    base_step = statistics.median(step_ms["plain"])
    for variant in variants:
        median = statistics.median(results[variant])
        paired = [plain / other - 1 for plain, other in zip(results["plain"], results[variant], strict=True)]
        paired_step = [other / plain - 1 for plain, other in zip(round_step_ms["plain"], round_step_ms[variant],
                                                                strict=True)]
        entry = {"median_tokens_per_s": median, "overhead_vs_plain": 1 - median / base,
                 "paired_overhead_median": statistics.median(paired),
                 "paired_overhead_ci95": bootstrap_interval(paired),
                 "median_decode_step_ms": statistics.median(step_ms[variant]),
                 "step_overhead_vs_plain": statistics.median(step_ms[variant]) / base_step - 1,
                 "paired_step_overhead_median": statistics.median(paired_step),
                 "paired_step_overhead_ci95": bootstrap_interval(paired_step),
                 "paired_step_overheads": paired_step}
        if per_step[variant]:
            ns = sorted(per_step[variant])
            entry.update(recorder_us_median=ns[len(ns) // 2] / 1000, recorder_us_mean=sum(ns) / len(ns) / 1000,
                         recorder_us_p99=ns[int(len(ns) * 0.99)] / 1000,
                         recorder_share_of_step=(sum(ns) / len(ns) / 1e9) * median,
                         recorder_share_of_plain_step=(sum(ns) / len(ns) / 1e6) / base_step)
        summary["variants"][variant] = entry
    return summary


def main() -> None:
    global AB_BLOCK, CHILD_CPUS, USE_NATIVE
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--twin", default="pythia-1.4b")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--extra", nargs="*", default=[], choices=OPTIONAL_VARIANTS,
                        help="variants to add to the three of the acceptance criteria")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS + OPTIONAL_VARIANTS,
                        help="run only these (plain is always included)")
    parser.add_argument("--cpus", help="pin the process to these cores, e.g. 2-7")
    parser.add_argument("--max-minutes", type=float, default=0, help="start no round after this long (0: no limit)")
    parser.add_argument("--ab-block", type=int, default=AB_BLOCK, help="decode steps per on/off block of '-ab' runs")
    parser.add_argument("--no-plain", action="store_true",
                        help="no plain runs (with only '-ab' variants, whose blocks need none): more pairs per minute")
    parser.add_argument("--children-cpus", help="pin the writer and NVML polling processes to these cores, e.g. 8-15")
    parser.add_argument("--ab-alternate", action="store_true",
                        help="start '-ab' runs of odd rounds with an 'off' block: step times drift within a "
                             "generation (the first steps are slower), which a fixed order books to 'on'")
    parser.add_argument("--skip-components", action="store_true", help="skip timing the hook's parts alone")
    parser.add_argument("--smoke", action="store_true", help="one short CPU round: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.new_tokens, args.prompt_tokens, args.device = 1, 40, 8, "cpu"
        args.variants, args.skip_components, args.ab_block = ["recorder", "recorder-ab", "poller-ab",
                                                             "recorder-all-python-ab"], True, 8
        args.out, USE_NATIVE = Path(tempfile.mkdtemp()) / "smoke.json", False
    began = time.perf_counter()
    AB_BLOCK = args.ab_block
    print(f"hyperthread siblings per core: {cpu_siblings()}", flush=True)
    if args.cpus:
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    if args.children_cpus:
        CHILD_CPUS = parse_cpus(args.children_cpus)
    if args.variants:
        variants = (() if args.no_plain else ("plain",)) + tuple(v for v in args.variants if v != "plain")
    else:
        variants = VARIANTS + tuple(args.extra)
    print(f"cores: {sorted(os.sched_getaffinity(0))}; load average {os.getloadavg()}", flush=True)
    if args.smoke:  # a 2-layer gpt_neox: the script's code paths, not a measurement
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, rotary_pct=0.25)).eval()
    else:
        model = build_twin(load_twin(args.twin), dtype="bfloat16", device=args.device)
    generator = torch.Generator().manual_seed(0)
    vocab = min(50000, int(model.config.vocab_size))
    ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=generator).to(args.device)
    workdir = Path(tempfile.mkdtemp())
    if any(v != "plain" and "python" not in v for v in variants) and not args.smoke:
        from kvscope.recorder import native

        started = time.perf_counter()
        native.build()
        print(f"native fast path ready in {time.perf_counter() - started:.1f} s ({native.build_directory()})",
              flush=True)
    for variant in variants:  # warm-up at full length: kernels load, allocator grows to its working size
        run_once(model, ids, args.new_tokens, variant, workdir)
    AB_RATIOS.clear()
    AB_PHASES.clear()
    costs = {} if args.skip_components else component_costs(model, ids, args.new_tokens)
    print("component costs (median µs):", json.dumps(costs), flush=True)
    results: dict[str, list[float]] = {v: [] for v in variants}
    per_step: dict[str, list[int]] = {v: [] for v in variants}
    step_ms: dict[str, list[float]] = {v: [] for v in variants}
    round_step_ms: dict[str, list[float]] = {v: [] for v in variants}
    outside_ms: dict[str, list[float]] = {v: [] for v in variants}
    summary: dict = {}
    for round_index in range(args.rounds):
        if args.max_minutes and time.perf_counter() - began > 60 * args.max_minutes:
            print(f"time limit: stopping after {round_index} rounds", flush=True)
            break
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in order:
            phase = round_index % 2 if args.ab_alternate else 0
            elapsed, steps, intervals = run_once(model, ids, args.new_tokens, variant, workdir, phase)
            results[variant].append(args.new_tokens / elapsed)
            per_step[variant].extend(steps)
            step_ms[variant].extend(intervals)
            round_step_ms[variant].append(statistics.median(intervals))
            # generate's time outside the decode steps: prefill, setup before and work after the loop
            outside_ms[variant].append(1e3 * elapsed - sum(intervals))
            print(f"round {round_index} {variant:20s} {args.new_tokens / elapsed:7.2f} tokens/s  "
                  f"median step {statistics.median(intervals):6.3f} ms", flush=True)
        summary = summarise(args, variants, costs, results, per_step, step_ms, round_step_ms)
        summary["outside_steps_ms"] = outside_ms
        if AB_RATIOS:
            summary["ab_block"] = AB_BLOCK
            summary["ab_block_ratios"] = AB_RATIOS
            summary["ab_phases"] = AB_PHASES
            summary["ab_block_overhead_median"] = {v: statistics.median(r) for v, r in AB_RATIOS.items()}
            summary["ab_block_overhead_ci95"] = {v: bootstrap_interval(r) for v, r in AB_RATIOS.items()}
        summary["step_intervals_ms"] = {v: [round(x, 4) for x in values] for v, values in step_ms.items()}
        args.out.write_text(json.dumps(summary, indent=2))
    if not summary:
        return
    for variant, ratios in AB_RATIOS.items():
        low, high = summary["ab_block_overhead_ci95"][variant]
        print(f"{variant}: hook on/off in alternate blocks of {AB_BLOCK} steps: {len(ratios)} block pairs, "
              f"median step {summary['ab_block_overhead_median'][variant] * 100:+.2f}% "
              f"[{low * 100:+.2f}, {high * 100:+.2f}]%")
    outside = summary["outside_steps_ms"]
    print("time outside the decode steps (prefill, generation start and end), median ms: "
          + ", ".join(f"{v} {statistics.median(x):.1f}" for v, x in outside.items()))
    print(f"{summary['rounds']} rounds on {summary['device']}")
    print(f"{'variant':20s} {'tok/s':>8s} {'overhead':>9s} {'paired':>8s} {'paired 95% CI':>16s} {'step ms':>8s} "
          f"{'step ovh':>8s} {'pair step':>9s} {'pair step 95% CI':>17s} {'rec µs med':>10s} {'rec µs mean':>11s} "
          f"{'share':>7s}")
    for variant, entry in summary["variants"].items():
        low, high = entry["paired_overhead_ci95"]
        step_low, step_high = entry["paired_step_overhead_ci95"]
        print(f"{variant:20s} {entry['median_tokens_per_s']:8.2f} {entry['overhead_vs_plain'] * 100:8.2f}% "
              f"{entry['paired_overhead_median'] * 100:7.2f}% [{low * 100:6.2f}, {high * 100:5.2f}]% "
              f"{entry['median_decode_step_ms']:8.3f} "
              f"{entry['step_overhead_vs_plain'] * 100:7.2f}% {entry['paired_step_overhead_median'] * 100:8.2f}% "
              f"[{step_low * 100:6.2f}, {step_high * 100:5.2f}]% "
              f"{entry.get('recorder_us_median', 0):10.1f} {entry.get('recorder_us_mean', 0):11.1f} "
              f"{entry.get('recorder_share_of_plain_step', 0) * 100:6.2f}%")


if __name__ == "__main__":
    main()
