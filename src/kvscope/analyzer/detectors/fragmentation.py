"""fragmentation: how much of what the allocator reserved is not in use, and did it retry?

F_t = (reserved − allocated) / reserved per step, averaged over each generation's steps; also the
split blocks' stranded bytes (inactive_split_bytes) and the allocator's retries (num_alloc_retries:
a cudaMalloc failed, the cache was flushed and the allocation retried — the step before an OOM).
Unused memory that the allocator already cached when the generation started (baseline reserved −
allocated, e.g. blocks freed while loading the model) is available to the generation, not wasted
by it: when it alone explains F, the finding is info. A fraction is judged by what it costs too:
unused bytes below a floor (absolute, and a share of the device or its memory limit) are info, and
so is unused memory that was there after the prefill and did not grow while decoding (the
allocator keeps a long prefill's workspace cached for reuse: on an H200 a gpt-oss-120b twin's
4,000-token prefill leaves 7.6 GiB unused, flat for the next 95 steps); fragmentation that costs
grows step after step (interleaved growing allocations: 5 MiB to 7 GiB over 128 steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector

NAME = "fragmentation"


@dataclass(frozen=True)
class Config:
    # Mean fraction of reserved memory not allocated, above which a generation is flagged; the
    # caching allocator's rounding and block reuse keep a healthy run at a few percent.
    max_mean_fraction: float = 0.15
    # Retries during a generation above which it is flagged (0: any retry).
    max_alloc_retries: int = 0
    # Mean fraction at or above which the finding is critical rather than a warning, when the
    # allocator also had to retry: memory is both wasted and running out.
    critical_fraction: float = 0.4
    # Mean unused (reserved − allocated) bytes below which a high fraction costs too little to
    # warn: a 300 MiB pool at 16% strands 48 MiB, less than rounding of a few 2 MiB blocks per
    # tensor size; a fragmentation worth changing the allocator for wastes hundreds of MiB.
    min_unused_bytes: int = 128 << 20
    # ... and below this share of the device's memory (its limit when capped): on a 140 GiB H200,
    # 0.2% is 287 MiB. The same floor applies to the growth of unused bytes during the generation
    # (last quarter's mean − after the prefill): a flat pool is a cached workspace, not fragmentation.
    min_unused_device_fraction: float = 0.002


_PER_GEN = """
    WITH st AS (
      SELECT *, max(step) OVER (PARTITION BY run_id, gen_id) AS gen_hi FROM steps
    ), s AS (
      SELECT run_id, gen_id,
        -- after the prefill = at the first decode step: the step-0 reading still holds the
        -- prefill's outputs (a gemma-4-31b twin's 4,048-token prompt: 2.4 GiB freed by step 1)
        coalesce(arg_min(reserved_bytes - allocated_bytes, step) FILTER (WHERE step >= 1),
                 arg_min(reserved_bytes - allocated_bytes, step)) AS first_unused,
        avg(reserved_bytes - allocated_bytes) FILTER (WHERE step >= 0.75 * gen_hi) AS last_unused,
        avg(CASE WHEN reserved_bytes > 0 THEN (reserved_bytes - allocated_bytes)::DOUBLE / reserved_bytes END) AS mean_f,
        max(CASE WHEN reserved_bytes > 0 THEN (reserved_bytes - allocated_bytes)::DOUBLE / reserved_bytes END) AS max_f,
        avg(CASE WHEN reserved_bytes > 0 THEN inactive_split_bytes::DOUBLE / reserved_bytes END) AS mean_split,
        max(inactive_split_bytes) AS max_split_bytes,
        max(reserved_bytes) AS peak_reserved,
        max(alloc_retries) AS retries_end, min(alloc_retries) AS retries_start,
        avg(CASE WHEN reserved_bytes > 0 THEN greatest(reserved_bytes - allocated_bytes
            - coalesce(greatest(g.baseline_reserved_bytes - g.baseline_allocated_bytes, 0), 0), 0)::DOUBLE
            / reserved_bytes END) AS mean_excess,
        any_value(greatest(g.baseline_reserved_bytes - g.baseline_allocated_bytes, 0)) AS cached_before,
        avg(reserved_bytes - allocated_bytes) AS mean_unused, max(reserved_bytes - allocated_bytes) AS max_unused,
        max(nvml_total_bytes) AS steps_total,
        count(reserved_bytes) AS readings
      FROM st LEFT JOIN generations g USING (run_id, gen_id) GROUP BY run_id, gen_id
    )
    SELECT s.*, greatest(retries_end - coalesce(
        lag(retries_end) OVER (PARTITION BY s.run_id ORDER BY gen_id), retries_start, 0), 0) AS retries,
      coalesce(r.memory_limit_bytes, s.steps_total, r.nvml_total_bytes) AS device_bytes
    FROM s LEFT JOIN (SELECT run_id, any_value(memory_limit_bytes) AS memory_limit_bytes,
                             any_value(nvml_total_bytes) AS nvml_total_bytes FROM run GROUP BY run_id) r
      ON s.run_id = r.run_id
    WHERE readings > 0 ORDER BY s.run_id, gen_id
"""


def _cost(r: dict) -> str:
    """The unused bytes, of what, and of the device: both numbers of the judgement."""
    device = (f", {r['mean_unused'] / r['device_bytes']:.2%} of the device's {human_bytes(r['device_bytes'])}"
              if r["device_bytes"] else "")
    return (f"{human_bytes(r['mean_unused'])} unused on average, of up to {human_bytes(r['peak_reserved'])} "
            f"reserved{device}")


def _floor(r: dict, cfg: Config) -> float:
    device = cfg.min_unused_device_fraction * r["device_bytes"] if r["device_bytes"] else 0.0
    return max(float(cfg.min_unused_bytes), device)


def _mean_finding(r: dict, cfg: Config, evidence: dict) -> Finding:
    if r["mean_excess"] is not None and r["mean_excess"] <= cfg.max_mean_fraction:
        return Finding(
            NAME, "info", r["run_id"], r["gen_id"], None, "mean_fragmentation", r["mean_f"], cfg.max_mean_fraction,
            f"{r['mean_f']:.0%} of reserved memory is unused during the generation, but the allocator already "
            f"cached {human_bytes(r['cached_before'])} before it started (e.g. freed while loading the model): "
            "call torch.cuda.empty_cache() before generating to return it to other processes.",
            evidence,
        )
    retried = r["retries"] is not None and r["retries"] > cfg.max_alloc_retries
    floor = _floor(r, cfg)
    if (r["mean_unused"] or 0) < floor and not retried:
        return Finding(
            NAME, "info", r["run_id"], r["gen_id"], None, "mean_fragmentation", r["mean_f"], cfg.max_mean_fraction,
            f"{r['mean_f']:.0%} of reserved memory is unused during the generation ({_cost(r)}), under the "
            f"{human_bytes(floor)} worth acting on: a small pool's rounding, nothing to do.",
            evidence,
        )
    growth = (r["last_unused"] or 0) - (r["first_unused"] or 0)
    if growth < floor and not retried:
        return Finding(
            NAME, "info", r["run_id"], r["gen_id"], None, "mean_fragmentation", r["mean_f"], cfg.max_mean_fraction,
            f"{r['mean_f']:.0%} of reserved memory is unused during the generation ({_cost(r)}), but "
            f"{human_bytes(r['first_unused'])} of it was already unused after the prefill and it changed by "
            f"{'+' if growth >= 0 else '-'}{human_bytes(abs(growth))} while decoding: the allocator keeps the prefill's "
            "workspace cached for reuse, which is not fragmentation; call torch.cuda.empty_cache() after a long "
            "prefill if other processes need the memory.",
            evidence,
        )
    split = r["mean_split"] is not None and r["mean_split"] >= r["mean_f"] / 2
    advice = ("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True or preallocate the cache (static cache)"
              if split else "freed blocks stay cached: preallocate the cache (static cache) or set "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    return Finding(
        NAME, "critical" if r["mean_f"] >= cfg.critical_fraction and retried else "warning", r["run_id"],
        r["gen_id"], None, "mean_fragmentation", r["mean_f"], cfg.max_mean_fraction,
        f"{r['mean_f']:.0%} of reserved memory is unused on average during the generation ({_cost(r)}; "
        f"{human_bytes(r['max_split_bytes'])} stranded in split blocks at most); {advice}.",
        evidence,
    )



@dataclass(frozen=True)
class Measured:
    """Per generation with allocator readings, ordered by run and generation: the _PER_GEN rows."""

    generations: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    return Measured(t.records(_PER_GEN))


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings: list[Finding] = []
    for r in m.generations:
        evidence = {"mean_fraction": r["mean_f"], "max_fraction": r["max_f"],
                    "mean_inactive_split_fraction": r["mean_split"], "max_inactive_split_bytes": r["max_split_bytes"],
                    "alloc_retries": r["retries"], "peak_reserved_bytes": r["peak_reserved"],
                    "cached_before_bytes": r["cached_before"], "mean_fraction_beyond_cached": r["mean_excess"],
                    "mean_unused_bytes": r["mean_unused"], "max_unused_bytes": r["max_unused"],
                    "device_bytes": r["device_bytes"], "min_unused_bytes": _floor(r, cfg),
                    "first_step_unused_bytes": r["first_unused"], "last_quarter_unused_bytes": r["last_unused"],
                    "unused_growth_bytes": (r["last_unused"] or 0) - (r["first_unused"] or 0)}
        if r["mean_f"] is not None and r["mean_f"] > cfg.max_mean_fraction:
            findings.append(_mean_finding(r, cfg, evidence))
        if r["retries"] is not None and r["retries"] > cfg.max_alloc_retries:
            findings.append(Finding(
                NAME, "warning", r["run_id"], r["gen_id"], None, "alloc_retries", r["retries"], cfg.max_alloc_retries,
                f"the allocator failed and retried {r['retries']} allocation(s) during the generation, flushing its "
                "cache each time: memory is nearly exhausted, so lower the batch or context or free memory first.",
                evidence,
            ))
    return findings


DETECTOR = Detector(NAME, Config, summary="reserved-but-unused memory per step and allocator retries",
                    measure=measure, judge=judge)
