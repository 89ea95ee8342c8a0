"""growth_curve: does the cache grow faster than linearly with the tokens it holds?

Fits bytes ~ tokens with a linear and a quadratic least-squares model, per layer (kv_bytes on the
step, i.e. on the context length) and for the step totals (kv_bytes on seq_len), and compares the
marginal rate (slope) over the last quarter of the generation's tokens with the first quarter.
Superlinear = convex and (R² gain > gain_threshold or marginal-rate ratio > ratio_threshold).
A concave layer whose growth stops (a sliding window) is reported as saturated, never superlinear.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.analyzer.findings import Finding, layer_list
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import layer_summary, step_fits

NAME = "growth_curve"


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
    # Also fit the per-step totals (steps.kv_bytes on seq_len), which catch copies kept outside
    # the layers' own tensors.
    check_totals: bool = True


def _classify_sql(source: str, keys: str, cfg: Config) -> str:
    """Rows of `source` with their verdict: superlinear, saturated or nothing."""
    return f"""
        WITH c AS (
          SELECT {keys}, n, slope, r2_lin, r2_quad, quad_b2, slope_first, slope_last,
            greatest(coalesce(r2_quad, 0) - coalesce(r2_lin, 0), 0) AS gain,
            CASE WHEN slope_first > 0 THEN slope_last / slope_first END AS ratio,
            CASE WHEN vyy > 0 THEN quad_b2 * (x_hi - x_lo) * (x_hi - x_lo) / (sqrt(vyy) * 3.4641016) END AS curvature
          FROM {source} WHERE n >= {int(cfg.min_points)} AND vyy > 0
        )
        SELECT *,
          CASE
            WHEN curvature > {cfg.min_curvature} AND (gain > {cfg.gain_threshold} OR ratio > {cfg.ratio_threshold})
              THEN 'superlinear'
            WHEN curvature < -{cfg.min_curvature} AND slope_first > 0
                 AND coalesce(slope_last, 0) <= {cfg.saturation_ratio} * slope_first
              THEN 'saturated'
          END AS verdict
        FROM c
    """


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


def detect(t: LoadedTraces, cfg: Config) -> list[Finding]:
    findings: list[Finding] = []
    summary = layer_summary(t)
    rows = t.records(f"""
        SELECT v.*, s.layer_type, s.stored_tokens FROM ({_classify_sql(summary, 'run_id, gen_id, layer', cfg)}) v
        JOIN {summary} s USING (run_id, gen_id, layer)
        WHERE verdict IS NOT NULL ORDER BY run_id, gen_id, layer
    """)
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
        fits = step_fits(t)
        for row in t.records(f"""
            SELECT * FROM ({_classify_sql(fits, 'run_id, gen_id', cfg)})
            WHERE verdict = 'superlinear' ORDER BY run_id, gen_id
        """):
            row["layer"] = None
            findings.append(_superlinear(row, cfg, "the cache's step total (steps.kv_bytes)"))
    return findings


DETECTOR = Detector(NAME, Config, detect, "superlinear KV growth (R² gain and marginal-rate ratio); saturation")
