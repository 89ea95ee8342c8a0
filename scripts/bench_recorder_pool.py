"""Pool several `bench_recorder.py` results (JSON, or .json.gz) of the same recorder code.

    python3 scripts/bench_recorder_pool.py docs/bench/recorder-h100-2026-11-26-{c,d,e,f}-*.json.gz
    python3 scripts/bench_recorder_pool.py --variant recorder-python FILE...
    python3 scripts/bench_recorder_pool.py --variant recorder-all --from-step 64 FILE...
    python3 scripts/bench_recorder_pool.py --aa alternate FILE...   # A/A: plain runs, nothing toggled

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
block estimators would book to "off"). Intervals: bootstrap over block pairs. Then the same
estimators with each hook-on block set against the mean of the hook-off blocks on both sides, which
cancels a linear drift of step times within the generation (see `report_sandwich_estimators`).
"""

from __future__ import annotations

import gzip
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


def load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)


def interval(values: list[float], resamples: int = 10000) -> str:
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return f"[{100 * medians[int(0.025 * resamples)]:+.2f}, {100 * medians[int(0.975 * resamples) - 1]:+.2f}]%"


@dataclass(frozen=True)
class Selection:
    """Which steps the block estimators read, and how blocks are labelled."""

    from_step: int = 0  # --from-step: leave out the blocks of each generation's first steps
    aa_phases: str | None = None  # --aa: label plain runs' blocks as if switched ("fixed" or "alternate")


def _runs(data: dict, variant: str, selection: Selection) -> list[tuple[int, dict[int, list[float]]]]:
    """(phase, step times by block) of every run of an "-ab" variant (or, for the A/A, of "plain");
    phase 0: block 0 is "on" (files without `ab_phases` always started "on")."""
    intervals = data.get("step_intervals_ms", {}).get(variant)
    if not intervals:
        return []
    block, per_run = data.get("ab_block", 32), data["new_tokens"] - 1
    phases = data.get("ab_phases", {}).get(variant, [])
    runs = []
    for index, start in enumerate(range(0, len(intervals), per_run)):
        blocks: dict[int, list[float]] = {}
        for k, value in enumerate(intervals[start:start + per_run]):
            if k >= selection.from_step:
                blocks.setdefault(k // block, []).append(value)
        if selection.aa_phases is not None:
            phase = index % 2 if selection.aa_phases == "alternate" else 0
        else:
            phase = phases[index] if index < len(phases) else 0
        runs.append((phase, blocks))
    return runs


def _block_pairs(data: dict, variant: str, selection: Selection) -> list[tuple[list[float], list[float]]]:
    """(hook-on block, next hook-off block) step times of every run of an "-ab" variant."""
    block = data.get("ab_block", 32)
    return [(blocks[b], blocks[b + 1]) for phase, blocks in _runs(data, variant, selection) for b in sorted(blocks)
            if (b + phase) % 2 == 0 and b + 1 in blocks and len(blocks[b + 1]) >= block // 2]


def _block_triples(data: dict, variant: str,
                   selection: Selection) -> list[tuple[list[float], list[float], list[float]]]:
    """(hook-off block, hook-on block, hook-off block) step times: every hook-on block with a full
    hook-off block on each side (all but a run's first and last)."""
    block = data.get("ab_block", 32)
    return [(blocks[b - 1], blocks[b], blocks[b + 1])
            for phase, blocks in _runs(data, variant, selection) for b in sorted(blocks)
            if (b + phase) % 2 == 0 and b - 1 in blocks and b + 1 in blocks and len(blocks[b + 1]) == block]


def _pair_ratios(pairs: list[tuple[list[float], list[float]]]) -> list[float]:
    """Median hook-on step over median hook-off step, minus 1, per pair (the bench's block ratios)."""
    return [statistics.median(on) / statistics.median(off) - 1 for on, off in pairs]


def _sandwich_median(triples: list) -> float:
    return statistics.median(statistics.median(on) / (0.5 * (statistics.median(before) + statistics.median(after))) - 1
                             for before, on, after in triples)


def _sandwich_mean(triples: list, cap: float) -> float:
    on = statistics.fmean(min(x, cap) for _, a, _ in triples for x in a)
    off = 0.5 * (statistics.fmean(min(x, cap) for b, _, _ in triples for x in b)
                 + statistics.fmean(min(x, cap) for _, _, c in triples for x in c))
    return on / off - 1


def report_sandwich_estimators(triples: list) -> None:
    """The same estimators against the mean of the hook-off blocks before and after each hook-on
    block. Step times drift within a generation (the first ~100 steps are 5-15% slower on the H100
    hosts, then they fall and rise again): a hook-on block compared with the next block alone,
    always 8 steps later, books the drift over those steps to the recorder; the two neighbours
    cancel any linear drift."""
    print(f"  against both neighbouring hook-off blocks ({len(triples)} blocks):")
    print(f"    median of block ratios: {100 * _sandwich_median(triples):+.2f}% "
          f"{_pairs_interval(triples, _sandwich_median)}")
    steps = sorted(x for t in triples for block in t for x in block)
    for label, cap in (("raw", float("inf")), ("steps capped at the 95% quantile", steps[int(0.95 * len(steps))])):
        def estimate(sample: list, cap: float = cap) -> float:
            return _sandwich_mean(sample, cap)

        print(f"    mean hook-on step / mean hook-off step, {label}: {100 * estimate(triples):+.2f}% "
              f"{_pairs_interval(triples, estimate)}")


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


def aa_check(arguments: list[str], block: int, selection: Selection) -> None:
    """The block estimators on plain runs, labelled "on"/"off" although nothing was switched: what
    they read when the recorder costs nothing (their bias on these hosts)."""
    pairs: list = []
    triples: list = []
    for name in arguments:
        data = dict(load(Path(name)), ab_block=block)
        pairs += _block_pairs(data, "plain", selection)
        triples += _block_triples(data, "plain", selection)
    print(f"A/A on plain runs, blocks of {block}, phases {selection.aa_phases}, from step {selection.from_step}: "
          f"{len(pairs)} pairs")
    if pairs:
        ratios = _pair_ratios(pairs)
        print(f"hook on/off blocks ({len(ratios)} pairs): median {100 * statistics.median(ratios):+.2f}% "
              f"{interval(ratios)}")
        report_step_estimators(pairs)
    if triples:
        report_sandwich_estimators(triples)


def main(arguments: list[str]) -> None:
    variant = "recorder"
    from_step, aa_phases = 0, None
    while arguments[:1] and arguments[0].startswith("--"):
        option, value, arguments = arguments[0], arguments[1], arguments[2:]
        if option == "--variant":
            variant = value
        elif option == "--from-step":
            from_step = int(value)
        elif option == "--aa":
            aa_phases = value
        else:
            raise SystemExit(f"unknown option {option}")
    selection = Selection(from_step, aa_phases)
    if aa_phases is not None:
        aa_check(arguments, 8, selection)
        return
    tokens, steps, outside, blocks, pairs, triples = [], [], [], [], [], []
    for name in arguments:
        data = load(Path(name))
        rates, medians = data["tokens_per_s"], data["round_median_step_ms"]
        file_pairs = _block_pairs(data, f"{variant}-ab", selection)
        pairs += file_pairs
        triples += _block_triples(data, f"{variant}-ab", selection)
        ratios = data.get("ab_block_ratios", [])
        if from_step:  # the bench's block ratios cover every step: recompute them over the kept blocks
            ratios = {f"{variant}-ab": _pair_ratios(file_pairs)}
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
    if triples:
        report_sandwich_estimators(triples)
    if outside:
        print(f"extra time outside the decode steps per generation: median {statistics.median(outside):.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
