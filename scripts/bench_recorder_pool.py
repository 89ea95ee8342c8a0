"""Pool several `bench_recorder.py` results (JSON, or .json.gz) of the same recorder code.

    python3 scripts/bench_recorder_pool.py docs/bench/recorder-h100-2026-11-26-{c,d,e,f}-*.json.gz
    python3 scripts/bench_recorder_pool.py --variant recorder-python FILE...

Prints, over all rounds of all files: the paired tokens/s and step-time overheads of the variant
("recorder" unless --variant names another; median, bootstrap 95% interval), the hook's on/off
block estimator of its "-ab" twin, the extra time outside the decode steps, and the recorder's own
share of the plain step (recorder_ns mean over the plain median step), per file.

For the "-ab" twin it also gives two estimators over the step times themselves (files that keep
`step_intervals_ms`): the ratio of the mean hook-on step to the mean hook-off step, pooled over all
block pairs (throughput is what a mean measures; medians hide rare costs such as the hand-over
every 64 steps), raw and with every step capped at the 95% quantile of all steps (the host's
multi-millisecond stalls dominate the raw mean's interval); and the spill-over: the first hook-off
step after a hook-on block against the other hook-off steps (a cost the next step pays, which the
block estimators would book to "off"). Intervals: bootstrap over block pairs.
"""

from __future__ import annotations

import gzip
import json
import random
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def interval(values: list[float], resamples: int = 10000) -> str:
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return f"[{100 * medians[int(0.025 * resamples)]:+.2f}, {100 * medians[int(0.975 * resamples) - 1]:+.2f}]%"


def _block_pairs(data: dict, variant: str) -> list[tuple[list[float], list[float]]]:
    """(hook-on block, next hook-off block) step times of every run of an "-ab" variant."""
    intervals = data.get("step_intervals_ms", {}).get(variant)
    if not intervals:
        return []
    block, per_run = data.get("ab_block", 32), data["new_tokens"] - 1
    pairs = []
    for start in range(0, len(intervals), per_run):
        blocks: dict[int, list[float]] = {}
        for k, value in enumerate(intervals[start:start + per_run]):
            blocks.setdefault(k // block, []).append(value)
        pairs += [(blocks[b], blocks[b + 1]) for b in sorted(blocks)
                  if b % 2 == 0 and b + 1 in blocks and len(blocks[b + 1]) >= block // 2]
    return pairs


def _mean_ratio(pairs: list[tuple[list[float], list[float]]], cap: float) -> float:
    on = [min(x, cap) for a, _ in pairs for x in a]
    off = [min(x, cap) for _, b in pairs for x in b]
    return statistics.fmean(on) / statistics.fmean(off) - 1


def _pairs_interval(pairs: list, estimate: object, resamples: int = 2000) -> str:
    rng = random.Random(0)
    values = sorted(estimate([rng.choice(pairs) for _ in pairs]) for _ in range(resamples))  # type: ignore[operator]
    return f"[{100 * values[int(0.025 * resamples)]:+.2f}, {100 * values[int(0.975 * resamples) - 1]:+.2f}]%"


def report_step_estimators(pairs: list[tuple[list[float], list[float]]]) -> None:
    steps = sorted(x for a, b in pairs for x in a + b)
    for label, cap in (("raw", float("inf")), ("steps capped at the 95% quantile", steps[int(0.95 * len(steps))])):
        def estimate(sample: list, cap: float = cap) -> float:
            return _mean_ratio(sample, cap)

        print(f"  mean hook-on step / mean hook-off step, {label}: {100 * estimate(pairs):+.2f}% "
              f"{_pairs_interval(pairs, estimate)}")
    first = [b[0] for _, b in pairs]
    rest = [x for _, b in pairs for x in b[1:]]
    print(f"  spill-over: first hook-off step / other hook-off steps (medians) "
          f"{100 * (statistics.median(first) / statistics.median(rest) - 1):+.2f}%")


def main(arguments: list[str]) -> None:
    variant = "recorder"
    if arguments[:1] == ["--variant"]:
        variant, arguments = arguments[1], arguments[2:]
    tokens, steps, outside, blocks, pairs = [], [], [], [], []
    for name in arguments:
        data = load(Path(name))
        rates, medians = data["tokens_per_s"], data["round_median_step_ms"]
        pairs += _block_pairs(data, f"{variant}-ab")
        ratios = data.get("ab_block_ratios", [])
        if isinstance(ratios, dict):  # one list per "-ab" variant (a list alone: "recorder-ab", older files)
            blocks += ratios.get(f"{variant}-ab", [])
        elif variant == "recorder":
            blocks += ratios
        if variant not in rates:
            print(f"{name}: no {variant} rounds (its -ab twin's blocks, if any, are pooled)")
            continue
        tokens += [plain / rec - 1 for plain, rec in zip(rates["plain"], rates[variant], strict=True)]
        steps += [rec / plain - 1 for plain, rec in zip(medians["plain"], medians[variant], strict=True)]
        if "outside_steps_ms" in data:
            outside += [rec - plain for plain, rec in zip(data["outside_steps_ms"]["plain"],
                                                         data["outside_steps_ms"][variant], strict=True)]
        share = data["variants"][variant].get("recorder_share_of_plain_step", 0)
        print(f"{name}: {len(rates['plain'])} rounds, recorder_ns mean / plain median step {100 * share:.2f}%")
    print(f"rounds pooled: {len(tokens)}")
    if tokens:
        print(f"paired tokens/s overhead: median {100 * statistics.median(tokens):+.2f}% {interval(tokens)}")
        print(f"paired median-step overhead: median {100 * statistics.median(steps):+.2f}% {interval(steps)}")
    if blocks:
        print(f"hook on/off blocks ({len(blocks)} pairs): median {100 * statistics.median(blocks):+.2f}% "
              f"{interval(blocks)}")
    if pairs:
        report_step_estimators(pairs)
    if outside:
        print(f"extra time outside the decode steps per generation: median {statistics.median(outside):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
