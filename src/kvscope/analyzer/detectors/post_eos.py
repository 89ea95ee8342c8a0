"""post_eos: is device memory back to its baseline after a generation ends?

Per generation, the memory left after the outputs are dropped and empty_cache() ran, over the
memory the generation added at its peak, split into three causes:
live tensors (allocated above baseline: a reference kept), allocator pools that empty_cache()
did not release (reserved − allocated above baseline: e.g. compiled graphs' private pools), and
memory outside PyTorch's allocator (NVML used − reserved above baseline: kernels, workspaces,
the CUDA context). Only live tensors are a leak by themselves; the other two are reported and
become a warning only when they keep growing over many generations without levelling off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import generation_scores

NAME = "post_eos"


@dataclass(frozen=True)
class Config:
    # Live-tensor retention (fraction of the generation's allocated peak growth) above which a
    # generation is flagged: a tenth of what it allocated is still referenced after it ended.
    live_threshold: float = 0.1
    # First generations whose live-tensor rise is warm-up when no later generation repeats it:
    # libraries allocate through PyTorch on first use (cuBLAS's workspace is 32 MiB: on a healthy
    # gemma-3-4b twin allocated memory rises 32 MiB after the first generation, then stays flat).
    live_warmup_generations: int = 1
    # Fraction of the generations that must retain live tensors for a systematic (critical) leak.
    systematic_fraction: float = 0.5
    # A single flagged generation is never systematic; fewer generations than this cannot be.
    min_generations_systematic: int = 2
    # Smaller live-tensor retention that is still a leak because it repeats: generations that each
    # keep at least this fraction of their peak growth and `min_repeat_bytes`, above the previous
    # one's, on `min_repeat_generations` generations, one of them past warm-up (a request's kept
    # logits: 16 MiB of a gemma-3-4b twin's 170 MiB peak after 1,000-token prompts, 9%, every time;
    # of a gemma-4-31b twin's 1.2 GiB after 1,100-token prompts, 1.3%). Healthy runs keep 0
    # allocated bytes after a settled generation (a warm-up: the first only; on the H200 lab's 60
    # control generations past it, at most 0.02 MiB either way).
    repeat_threshold: float = 0.005
    # Bytes a generation must keep for the repeated rule: allocator rounding never reaches them.
    min_repeat_bytes: int = 1 << 20
    # Generations that must each keep them (one a generation past `live_warmup_generations`).
    min_repeat_generations: int = 2
    # Pool / outside-allocator retention above which an info finding reports it.
    info_threshold: float = 0.05
    # First generations whose rise in pools or outside the allocator is warm-up (kernels loaded,
    # workspaces sized), never counted towards a trend.
    warmup_generations: int = 2
    # Post-warm-up generations, each rising, needed to call such a rise a trend (a warning).
    min_trend_generations: int = 4
    # A trend levels off when the mean rise of its second half falls below this fraction of its
    # first half's (0.66, 0.12, 0.09 on a healthy gemma-3-4b twin levels off).
    level_off_ratio: float = 0.5


@dataclass(frozen=True)
class Measured:
    """Per generation, ordered by run and generation: the rows of summaries.generation_scores."""

    generations: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    return Measured(t.records(f"SELECT * FROM {generation_scores(t)} ORDER BY run_id, gen_id"))


def _each(rows: list[dict]) -> str:
    low, high = human_bytes(min(r["live_bytes"] for r in rows)), human_bytes(max(r["live_bytes"] for r in rows))
    return f"{low} each" if low == high else f"{low} to {high} each"


def _repeated_findings(rows: list[dict], cfg: Config) -> list[Finding]:
    """Live tensors kept after generation after generation, each time too few to pass `live_threshold`."""
    keeping = [r for r in rows if r["live"] is not None and r["live"] >= cfg.repeat_threshold
               and (r["live_bytes"] or 0) >= cfg.min_repeat_bytes and r["post_live_rises"]]
    if len(keeping) < cfg.min_repeat_generations or not any(
            r["ordinal"] >= cfg.live_warmup_generations for r in keeping):
        return []
    kept = sum(r["live_bytes"] for r in keeping)
    return [Finding(
        NAME, "warning", rows[0]["run_id"], None, None, "live_retention", max(r["live"] for r in keeping),
        cfg.repeat_threshold,
        f"repeated leak: live tensors stay allocated after {len(keeping)} of {rows[0]['gens']} generations "
        f"({_each(keeping)}, {human_bytes(kept)} in all; small next to each generation's peak, but every request adds it); "
        "drop the references to generate()'s outputs, scores or logits you keep.",
        {"systematic": False, "repeated": True, "generations": [r["gen_id"] for r in keeping],
         "live_scores": [r["live"] for r in keeping], "live_bytes": [r["live_bytes"] for r in keeping]},
    )]


def _live_findings(rows: list[dict], cfg: Config) -> list[Finding]:
    flagged = [r for r in rows if r["live"] is not None and r["live"] > cfg.live_threshold]
    if not flagged:
        return _repeated_findings(rows, cfg)
    last = max(r["ordinal"] for r in flagged)
    repeated_later = [r for r in rows if r["ordinal"] > last and r["live"] is not None]
    if last < cfg.live_warmup_generations and repeated_later:  # later generations are clean: warm-up
        return [Finding(
            NAME, "info", r["run_id"], r["gen_id"], None, "live_retention", r["live"], cfg.live_threshold,
            f"{human_bytes(r['live_bytes'])} stayed allocated after this first generation only, not after the "
            f"{len(repeated_later)} later one(s): a workspace or buffer allocated on first use (warm-up), not a leak.",
            {"warmup": True, "live_bytes": r["live_bytes"], "allocated_growth": r["alloc_growth"]},
        ) for r in flagged] + _repeated_findings([r for r in rows if r not in flagged], cfg)  # warm-up is not a repeat
    gens = rows[0]["gens"]
    growing = len(flagged) >= 2 and all(r["post_live_rises"] for r in flagged)
    systematic = gens >= cfg.min_generations_systematic and len(flagged) >= 2 and (
        len(flagged) >= cfg.systematic_fraction * gens or growing)
    if systematic:
        worst = max(r["live"] for r in flagged)
        return [Finding(
            NAME, "critical", rows[0]["run_id"], None, None, "live_retention", worst, cfg.live_threshold,
            f"systematic leak: live tensors stay allocated after {len(flagged)} of {gens} generations "
            f"(up to {worst:.0%} of each generation's peak, {human_bytes(sum(r['live_bytes'] for r in flagged))} "
            "in all); drop the references to generate()'s outputs, past_key_values or logits you keep.",
            {"systematic": True, "generations": [r["gen_id"] for r in flagged], "growing": growing,
             "live_scores": [r["live"] for r in flagged], "live_bytes": [r["live_bytes"] for r in flagged]},
        )]
    return [Finding(
        NAME, "warning", r["run_id"], r["gen_id"], None, "live_retention", r["live"], cfg.live_threshold,
        f"{human_bytes(r['live_bytes'])} of live tensors ({r['live']:.0%} of the generation's peak) stay "
        "allocated after the generation, gc and empty_cache(); look for a kept reference to its outputs or cache.",
        {"systematic": False, "live_bytes": r["live_bytes"], "allocated_growth": r["alloc_growth"],
         "nvml_score": r["nvml_score"]},
    ) for r in flagged]


_CAUSES = {
    "pools": ("pool_bytes", "pool_retention", "allocator pools that empty_cache() did not release",
              "(compiled graphs' private pools, CUDA graphs)"),
    "outside": ("outside_bytes", "outside_allocator_retention", "memory outside PyTorch's allocator",
                "(kernels loaded on first use, cuBLAS/cuDNN workspaces, NCCL, the CUDA context)"),
}


def _cause_findings(rows: list[dict], cause: str, cfg: Config) -> list[Finding]:
    bytes_col, metric, what, why = _CAUSES[cause]
    scored = [r for r in rows if r[cause] is not None]
    after = [r for r in scored if r["ordinal"] >= cfg.warmup_generations]
    half = len(after) // 2
    trend = (len(after) >= cfg.min_trend_generations
             and all(r[cause] > cfg.info_threshold for r in after)
             and sum(r[bytes_col] for r in after[half:]) / max(len(after) - half, 1)
             >= cfg.level_off_ratio * sum(r[bytes_col] for r in after[:half]) / max(half, 1))
    if trend:
        total = sum(r[bytes_col] for r in after)
        return [Finding(
            NAME, "warning", rows[0]["run_id"], None, None, metric, max(r[cause] for r in after), cfg.info_threshold,
            f"{what} grew after each of {len(after)} generations past warm-up ({human_bytes(total)} in all) "
            f"without levelling off {why}; find what each generation adds that is never freed.",
            {"generations": [r["gen_id"] for r in after], "scores": [r[cause] for r in after],
             "bytes": [r[bytes_col] for r in after], "warmup_generations": cfg.warmup_generations},
        )]
    return [Finding(
        NAME, "info", r["run_id"], r["gen_id"], None, metric, r[cause], cfg.info_threshold,
        f"{human_bytes(r[bytes_col])} ({r[cause]:.0%} of the generation's peak) stayed in {what} {why}"
        + ("; warm-up on the first generations, not a leak." if r["ordinal"] < cfg.warmup_generations
           else "; it does not keep growing, so it is not a leak."),
        {"bytes": r[bytes_col], "warmup": r["ordinal"] < cfg.warmup_generations, "nvml_score": r["nvml_score"]},
    ) for r in scored if r[cause] > cfg.info_threshold]


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings: list[Finding] = []
    by_run: dict[str, list[dict]] = {}
    for row in m.generations:
        by_run.setdefault(row["run_id"], []).append(row)
    for rows in by_run.values():
        findings.extend(_live_findings(rows, cfg))
        findings.extend(_cause_findings(rows, "pools", cfg))
        findings.extend(_cause_findings(rows, "outside", cfg))
    return findings


DETECTOR = Detector(NAME, Config, summary="memory retained after a generation: live tensors, pools, outside the allocator",
                    measure=measure, judge=judge)
