"""growth_curve: does the cache grow faster than linearly with the tokens it holds?

Fits bytes ~ tokens with a linear and a quadratic least-squares model, per layer (kv_bytes on the
step, i.e. on the context length) and for the step totals (kv_bytes on seq_len), over the decode
steps (a sliding layer's prefill view holds the whole prompt at step 0), and compares the
marginal rate (slope) over the last quarter of the generation's tokens with the first quarter.
Superlinear = convex and (R² gain > gain_threshold or marginal-rate ratio > ratio_threshold).
A concave layer whose growth stops (a sliding window) is reported as saturated, never superlinear.

The allocator's footprint is fitted too, per generation over the decode steps: allocated bytes are
attributed to the cache (steps.kv_bytes) and to everything outside it (allocated − kv_bytes).
Memory outside the cache that grows superlinearly (the same convexity and gain / marginal-rate
rule) is flagged when it grew by more than a floor relative to the cache (or the device), and rose
on most steps: kept attention weights (output_attentions), a callback or logits processor that
keeps copies of keys, per-step outputs kept in a list. A one-off workspace is a step, not growth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes, layer_list
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import FIT_DERIVED, R2_QUAD, decode_step_fits, fit_aggregates, layer_summary
from kvscope.schema.layer_types import constant_types_sql

NAME = "growth_curve"
OUTSIDE_FITS = "_kvscope_outside_fits"


@dataclass(frozen=True)
class Config:
    # R²_quad − R²_lin above which a convex curve counts as superlinear (the original rule).
    gain_threshold: float = 0.05
    # Slope over the last quarter of tokens / slope over the first quarter above which a convex
    # curve counts as superlinear: catches quadratic leaks whose R² gain stays tiny.
    ratio_threshold: float = 1.25
    # Ratio at or above which a superlinear curve is critical rather than a warning.
    critical_ratio: float = 2.0
    # Curvature (b2 · x_range² relative to the bytes range) below which a curve counts as straight.
    min_curvature: float = 0.01
    # A concave curve whose last-quarter slope is at most this fraction of its first-quarter slope
    # has saturated (a sliding window filled up).
    saturation_ratio: float = 0.1
    # Fewer points than this per curve: too short to judge.
    min_points: int = 8
    # Also fit the per-step totals (steps.kv_bytes on seq_len, decode steps: a sliding layer's view
    # of a long prefill pins the prompt's whole storage at step 0 only, a drop that reads as
    # curvature), which catch copies kept outside the layers' own tensors.
    check_totals: bool = True
    # Also fit the allocator's footprint outside the cache (steps.allocated_bytes − kv_bytes on
    # seq_len, decode steps): kept attentions, logits or key copies live there, not in the cache.
    check_outside: bool = True
    # Memory outside the cache must grow by at least this fraction of the cache's bytes at the
    # generation's last step to be flagged: a healthy decode loop's outside bytes move by a few
    # KiB (input ids, masks) while a leak there reaches the cache's own size.
    min_outside_cache_fraction: float = 0.1
    # ... or by this fraction of the device's memory (its limit when capped), whichever is smaller,
    # so that a tiny cache on a large GPU does not make every KiB of growth count.
    min_outside_device_fraction: float = 0.01
    # ... and never by less than this many bytes: allocator rounding (512 B, 2 MiB blocks) and
    # library workspaces are below it.
    min_outside_bytes: int = 4 << 20
    # Fraction of decode steps on which the outside bytes must rise: growth accumulates step after
    # step, a workspace allocated once (cuBLAS's 32 MiB on first use) is a single step up.
    min_rising_fraction: float = 0.5
    # Memory outside the cache that grows linearly (a long prompt: each step keeps a copy of about
    # the same size) is flagged, past the same floor, when it grows at least this many times faster
    # per token than the cache itself. Requested per-step outputs stay below: output_scores and
    # output_logits add 250 KiB per token with a 32,000-word vocabulary, 1.3-12x the twins' cache
    # rates on the H200; a logits processor keeping four layers' keys of a 1,000-token context adds
    # 8 MiB per token, 148-458x a gemma-3-4b twin's (its sliding layers full, its cache barely grows).
    linear_outside_rate_ratio: float = 20.0


_FIT_COLUMNS = "n, slope, r2_lin, r2_quad, quad_b2, slope_first, slope_last, vyy, x_lo, x_hi"


@dataclass(frozen=True)
class Measured:
    """The least-squares fits, each ordered by run and generation (and layer): per layer (kv_bytes on
    the step over decode steps, summaries.layer_summary), of the step totals on seq_len over decode steps, and of the
    allocator's bytes outside the cache on seq_len over decode steps (with the bytes at either end,
    the share of rising steps and the device's memory)."""

    layers: list[dict[str, Any]]
    totals: list[dict[str, Any]]
    outside: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    summary = layer_summary(t, decode_only=True)
    layers = t.records(f"""
        SELECT run_id, gen_id, layer, {_FIT_COLUMNS}, layer_type, stored_tokens FROM {summary}
        WHERE layer_type NOT IN {constant_types_sql()} ORDER BY run_id, gen_id, layer
    """)
    totals = t.records(f"SELECT run_id, gen_id, {_FIT_COLUMNS}, last_kv_bytes FROM {decode_step_fits(t)} "
                       "ORDER BY run_id, gen_id")
    outside = t.records(f"""
        SELECT run_id, gen_id, {_FIT_COLUMNS}, y_first, y_last, kv_first, kv_last, rising_fraction, device_bytes
        FROM {outside_fits(t)} ORDER BY run_id, gen_id
    """)
    return Measured(layers, totals, outside)


def classify(row: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The row with its R² gain, marginal-rate ratio, curvature and verdict (superlinear, saturated
    or None); None for a curve too short or flat to judge."""
    if row["n"] < cfg.min_points or not (row["vyy"] is not None and row["vyy"] > 0):
        return None
    gain = max((row["r2_quad"] or 0) - (row["r2_lin"] or 0), 0)
    first, last = row["slope_first"], row["slope_last"]
    ratio = last / first if first is not None and first > 0 and last is not None else None
    curvature = (row["quad_b2"] * (row["x_hi"] - row["x_lo"]) * (row["x_hi"] - row["x_lo"])
                 / (math.sqrt(row["vyy"]) * 3.4641016) if row["quad_b2"] is not None else None)
    verdict = None
    if curvature is not None and curvature > cfg.min_curvature and (
            gain > cfg.gain_threshold or (ratio is not None and ratio > cfg.ratio_threshold)):
        verdict = "superlinear"
    elif (curvature is not None and curvature < -cfg.min_curvature and first is not None and first > 0
          and (last or 0) <= cfg.saturation_ratio * first):
        verdict = "saturated"
    return {**row, "gain": gain, "ratio": ratio, "curvature": curvature, "verdict": verdict}


def _superlinear(row: dict, cfg: Config, what: str) -> Finding:
    ratio = row["ratio"]
    severity = "critical" if ratio is not None and ratio >= cfg.critical_ratio else "warning"
    rule = (f"marginal rate x{ratio:.2f} from the first to the last quarter" if ratio is not None
            else f"R² gain {row['gain']:.3f}")
    return Finding(
        NAME, severity, row["run_id"], row["gen_id"], row.get("layer"), "marginal_rate_ratio",
        ratio if ratio is not None else row["gain"], cfg.ratio_threshold if ratio is not None else cfg.gain_threshold,
        f"{what} grows superlinearly ({rule}): something keeps a copy of the cache each step; "
        "find the reference that accumulates past key/values.",
        {"slope_bytes_per_token": row["slope"], "r2_linear": row["r2_lin"], "r2_quadratic": row["r2_quad"],
         "r2_gain": row["gain"], "slope_first_quarter": row["slope_first"],
         "slope_last_quarter": row["slope_last"], "points": row["n"]},
    )


def _judged(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The rows that classify as superlinear or saturated."""
    return [c for c in (classify(r, cfg) for r in rows) if c is not None and c["verdict"] is not None]


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings: list[Finding] = []
    rows = _judged(m.layers, cfg)
    saturated: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        if row["verdict"] == "superlinear":
            findings.append(_superlinear(row, cfg, f"layer {row['layer']} ({row['layer_type']})"))
        else:
            saturated.setdefault((row["run_id"], row["gen_id"], row["stored_tokens"]), []).append(row)
    for (run_id, gen_id, tokens), group in saturated.items():
        layers = [r["layer"] for r in group]
        types = sorted({r["layer_type"] for r in group})
        findings.append(Finding(
            NAME, "info", run_id, gen_id, layers[0] if len(layers) == 1 else None, "saturated_tokens", tokens, None,
            f"layer{'s' if len(layers) > 1 else ''} {layer_list(layers)} ({', '.join(types)}) grew linearly and "
            f"saturated at {tokens} tokens, as a sliding window should; nothing to do.",
            {"layers": layers, "layer_types": types, "saturated_at_tokens": tokens,
             "slopes_first_quarter": [r["slope_first"] for r in group],
             "slopes_last_quarter": [r["slope_last"] for r in group]},
        ))
    if cfg.check_totals:
        for row in _judged(m.totals, cfg):
            if row["verdict"] == "superlinear":
                findings.append(_superlinear({**row, "layer": None}, cfg, "the cache's step total (steps.kv_bytes)"))
    if cfg.check_outside:
        findings.extend(_outside(m, cfg))
    return findings


def outside_fits(t: Engine) -> str:
    """One row per (run, generation): fit of the allocator's bytes outside the cache on seq_len.

    Decode steps only (step ≥ 1): the prefill runs in another regime (a sliding layer's prefill
    view pins the whole prompt's storage until the next step). Also the cache's first and last
    bytes, the outside bytes' first and last values, the share of steps they rose on, and the
    device's memory (its limit when capped).
    """
    return t.cached_table(OUTSIDE_FITS, f"""
        WITH s AS (
          SELECT run_id, gen_id, step, CAST(seq_len AS DOUBLE) AS x,
            CAST(allocated_bytes - kv_bytes AS DOUBLE) AS y, kv_bytes AS kv, nvml_total_bytes,
            (allocated_bytes - kv_bytes)
              - lag(allocated_bytes - kv_bytes) OVER (PARTITION BY run_id, gen_id ORDER BY step) AS dy
          FROM steps WHERE allocated_bytes IS NOT NULL AND kv_bytes IS NOT NULL AND step >= 1
        ), r AS (SELECT run_id, gen_id, min(x) AS seq_lo, max(x) AS seq_hi FROM s GROUP BY run_id, gen_id),
        agg AS (
          SELECT s.run_id, s.gen_id, {fit_aggregates("s.x", "s.y", ("r.seq_lo", "r.seq_hi"))},
            arg_min(s.y, s.step) AS y_first, arg_max(s.y, s.step) AS y_last,
            arg_min(s.kv, s.step) AS kv_first, arg_max(s.kv, s.step) AS kv_last,
            avg(CASE WHEN s.dy > 0 THEN 1.0 WHEN s.dy IS NOT NULL THEN 0.0 END) AS rising_fraction,
            max(s.nvml_total_bytes) AS steps_total
          FROM s JOIN r ON s.run_id = r.run_id AND s.gen_id = r.gen_id GROUP BY s.run_id, s.gen_id
        ), fit AS (SELECT agg.*, {FIT_DERIVED} FROM agg)
        SELECT fit.*, {R2_QUAD} AS r2_quad,
          coalesce(run.memory_limit_bytes, fit.steps_total, run.nvml_total_bytes) AS device_bytes
        FROM fit LEFT JOIN (SELECT run_id, any_value(memory_limit_bytes) AS memory_limit_bytes,
                                   any_value(nvml_total_bytes) AS nvml_total_bytes FROM run GROUP BY run_id) run
          ON fit.run_id = run.run_id
    """)


def _cache_growth(cache: dict | None) -> tuple[str, str]:
    """How the cache itself grew in the generation (verdict, words), from its step-total fit."""
    if cache is None or not cache.get("vyy") or abs(cache.get("slope") or 0.0) < 1e-9:
        size = f" at {human_bytes(cache['last_kv_bytes'])}" if cache and cache.get("last_kv_bytes") else ""
        return "flat", f"the cache stays flat{size} (preallocated or full)"
    if cache["verdict"] == "saturated":
        return "saturated", "the cache grows and saturates (sliding window)"
    if cache["verdict"] == "superlinear":
        return "superlinear", f"the cache itself grows superlinearly ({human_bytes(cache['slope'])} per token on average)"
    return "linear", f"the cache grows linearly ({human_bytes(cache['slope'])} per token)"


def _outside(m: Measured, cfg: Config) -> list[Finding]:
    # the cache's own verdict (classify leaves out flat and too-short curves: verdict None)
    cache_rows = {}
    for r in m.totals:
        judged = classify(r, cfg)
        cache_rows[(r["run_id"], r["gen_id"])] = {**r, "verdict": judged["verdict"] if judged else None}
    findings = []
    for r in (classify(row, cfg) for row in m.outside):
        if r is None or r["verdict"] == "saturated":
            continue
        grown = r["y_last"] - r["y_first"]
        relative = cfg.min_outside_cache_fraction * max(r["kv_last"] or 0, 0)
        if r["device_bytes"]:
            relative = min(relative, cfg.min_outside_device_fraction * r["device_bytes"]) if relative > 0 \
                else cfg.min_outside_device_fraction * r["device_bytes"]
        floor = max(float(cfg.min_outside_bytes), relative)
        if grown < floor or (r["rising_fraction"] or 0.0) < cfg.min_rising_fraction:
            continue
        if r["verdict"] is None:
            linear = _linear_outside(r, cache_rows.get((r["run_id"], r["gen_id"])), grown, floor, cfg)
            findings.extend([linear] if linear is not None else [])
            continue
        ratio = r["ratio"]
        severity = "critical" if ratio is not None and ratio >= cfg.critical_ratio else "warning"
        how = "quadratically" if (r["r2_quad"] or 0) >= 0.99 else "superlinearly"
        rule = (f"x{ratio:.1f} marginal rate from the first to the last quarter" if ratio is not None
                else f"R² gain {r['gain']:.3f}")
        tokens = r["x_hi"] - r["x_lo"]
        cache_verdict, cache_text = _cache_growth(cache_rows.get((r["run_id"], r["gen_id"])))
        cache = cache_rows.get((r["run_id"], r["gen_id"])) or {}
        findings.append(Finding(
            NAME, severity, r["run_id"], r["gen_id"], None, "outside_marginal_rate_ratio",
            ratio if ratio is not None else r["gain"], cfg.ratio_threshold if ratio is not None else cfg.gain_threshold,
            f"{cache_text}; something outside it grows {how} ({rule}, "
            f"+{human_bytes(grown)} over {tokens:,.0f} tokens, now {human_bytes(r['slope_last'] or r['slope'])} per "
            "token): drop per-step outputs you do not need (output_attentions, output_scores, "
            "output_hidden_states) or find the callback or logits processor that keeps tensors each step.",
            {"outside_grown_bytes": grown, "floor_bytes": floor, "outside_first_bytes": r["y_first"],
             "outside_last_bytes": r["y_last"], "cache_first_bytes": r["kv_first"], "cache_last_bytes": r["kv_last"],
             "cache_verdict": cache_verdict, "cache_slope_bytes_per_token": cache.get("slope"),
             "slope_bytes_per_token": r["slope"], "slope_first_quarter": r["slope_first"],
             "slope_last_quarter": r["slope_last"], "r2_linear": r["r2_lin"], "r2_quadratic": r["r2_quad"],
             "r2_gain": r["gain"], "rising_fraction": r["rising_fraction"], "device_bytes": r["device_bytes"],
             "points": r["n"]},
        ))
    return findings


def _linear_outside(r: dict[str, Any], cache: dict | None, grown: float, floor: float, cfg: Config) -> Finding | None:
    """Memory outside the cache growing linearly, many times faster per token than the cache."""
    slope = r["slope"] or 0.0
    cache_slope = (cache or {}).get("slope") or 0.0
    if slope <= 0:
        return None
    rate_ratio = slope / cache_slope if cache_slope > 0 else math.inf
    if rate_ratio < cfg.linear_outside_rate_ratio:
        return None
    _, cache_text = _cache_growth(cache)
    times = f"{rate_ratio:,.0f}x the cache's rate" if math.isfinite(rate_ratio) else "while the cache does not grow"
    tokens = r["x_hi"] - r["x_lo"]
    return Finding(
        NAME, "warning", r["run_id"], r["gen_id"], None, "outside_linear_rate_ratio",
        rate_ratio if math.isfinite(rate_ratio) else float(slope), cfg.linear_outside_rate_ratio,
        f"{cache_text}; something outside it grows linearly, {human_bytes(slope)} per token ({times}, "
        f"+{human_bytes(grown)} over {tokens:,.0f} tokens): every step keeps tensors that outlive it; drop "
        "per-step outputs you do not need (output_attentions, output_scores, output_hidden_states) or find "
        "the callback or logits processor that keeps them.",
        {"outside_grown_bytes": grown, "floor_bytes": floor, "slope_bytes_per_token": slope,
         "cache_slope_bytes_per_token": cache_slope, "rate_ratio": rate_ratio if math.isfinite(rate_ratio) else None,
         "outside_first_bytes": r["y_first"], "outside_last_bytes": r["y_last"], "cache_last_bytes": r["kv_last"],
         "r2_linear": r["r2_lin"], "rising_fraction": r["rising_fraction"], "points": r["n"]},
    )


DETECTOR = Detector(NAME, Config, summary="superlinear KV growth (R² gain and marginal-rate ratio); saturation",
                    measure=measure, judge=judge)
