"""Pool several `bench_recorder.py` results (JSON, or .json.gz) of the same recorder code.

    python3 scripts/bench_recorder_pool.py docs/bench/recorder-h100-2026-11-26-{c,d,e,f}-*.json.gz
    python3 scripts/bench_recorder_pool.py --variant recorder-python FILE...

Prints, over all rounds of all files: the paired tokens/s and step-time overheads of the variant
("recorder" unless --variant names another; median, bootstrap 95% interval), the hook's on/off
block estimator of its "-ab" twin, the extra time outside the decode steps, and the recorder's own
share of the plain step (recorder_ns mean over the plain median step), per file.
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


def main(arguments: list[str]) -> None:
    variant = "recorder"
    if arguments[:1] == ["--variant"]:
        variant, arguments = arguments[1], arguments[2:]
    tokens, steps, outside, blocks = [], [], [], []
    for name in arguments:
        data = load(Path(name))
        rates, medians = data["tokens_per_s"], data["round_median_step_ms"]
        if variant not in rates:
            print(f"{name}: no {variant} rounds")
            continue
        tokens += [plain / rec - 1 for plain, rec in zip(rates["plain"], rates[variant], strict=True)]
        steps += [rec / plain - 1 for plain, rec in zip(medians["plain"], medians[variant], strict=True)]
        if "outside_steps_ms" in data:
            outside += [rec - plain for plain, rec in zip(data["outside_steps_ms"]["plain"],
                                                         data["outside_steps_ms"][variant], strict=True)]
        ratios = data.get("ab_block_ratios", [])
        if isinstance(ratios, dict):  # one list per "-ab" variant (a list alone: "recorder-ab", older files)
            blocks += ratios.get(f"{variant}-ab", [])
        elif variant == "recorder":
            blocks += ratios
        share = data["variants"][variant].get("recorder_share_of_plain_step", 0)
        print(f"{name}: {len(rates['plain'])} rounds, recorder_ns mean / plain median step {100 * share:.2f}%")
    print(f"rounds pooled: {len(tokens)}")
    print(f"paired tokens/s overhead: median {100 * statistics.median(tokens):+.2f}% {interval(tokens)}")
    print(f"paired median-step overhead: median {100 * statistics.median(steps):+.2f}% {interval(steps)}")
    if blocks:
        print(f"hook on/off blocks ({len(blocks)} pairs): median {100 * statistics.median(blocks):+.2f}% "
              f"{interval(blocks)}")
    if outside:
        print(f"extra time outside the decode steps per generation: median {statistics.median(outside):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
