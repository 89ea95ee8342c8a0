"""Per-generation and per-layer summaries that several detectors share, each one SQL scan.

`layer_summary` reads the `layers` table once and keeps, per (run, generation, layer), the
least-squares sums of a linear and a quadratic fit of kv_bytes on the step, the slopes over the
first and last quarter of the generation, and the values at the layer's last step. It is a small
temporary table (one row per generation and layer) that growth_curve, layer_anomaly,
layer_uniformity, cache_density and preallocation_waste all read, so a trace of millions of layer
rows is scanned once however many detectors run.
"""

from __future__ import annotations

from kvscope.analyzer.load import LoadedTraces

STEP_RANGES = "_kvscope_step_ranges"
LAYER_SUMMARY = "_kvscope_layer_summary"
STEP_FITS = "_kvscope_step_fits"


def fit_aggregates(x: str, y: str, quarter_of: tuple[str, str] | None) -> str:
    """Aggregates of a linear and a quadratic least-squares fit of y on x (centred, stable sums)."""
    parts = [
        "count(*) AS n",
        f"regr_slope({y}, {x}) AS slope",
        f"regr_intercept({y}, {x}) AS intercept",
        f"regr_r2({y}, {x}) AS r2_lin",
        f"var_pop({x}) AS vxx",
        f"covar_pop({x}, {x} * {x}) AS vxq",
        f"var_pop({x} * {x}) AS vqq",
        f"covar_pop({x}, {y}) AS cxy",
        f"covar_pop({x} * {x}, {y}) AS cqy",
        f"var_pop({y}) AS vyy",
        f"min({x}) AS x_lo",
        f"max({x}) AS x_hi",
    ]
    if quarter_of is not None:
        lo, hi = quarter_of
        parts.append(f"regr_slope({y}, {x}) FILTER (WHERE {x} <= {lo} + ({hi} - {lo}) * 0.25) AS slope_first")
        parts.append(f"regr_slope({y}, {x}) FILTER (WHERE {x} >= {hi} - ({hi} - {lo}) * 0.25) AS slope_last")
    return ",\n  ".join(parts)


# Quadratic fit from the centred sums: solve [vxx vxq; vxq vqq] [b1 b2]' = [cxy cqy]'.
FIT_DERIVED = """
  CASE WHEN vxx * vqq - vxq * vxq > 0 THEN (cxy * vqq - cqy * vxq) / (vxx * vqq - vxq * vxq) END AS quad_b1,
  CASE WHEN vxx * vqq - vxq * vxq > 0 THEN (cqy * vxx - cxy * vxq) / (vxx * vqq - vxq * vxq) END AS quad_b2
"""
R2_QUAD = """
  CASE WHEN vyy > 0 AND quad_b1 IS NOT NULL THEN least(1.0, greatest(0.0, (quad_b1 * cxy + quad_b2 * cqy) / vyy)) END
"""


def step_ranges(t: LoadedTraces) -> str:
    """Per (run, generation): first and last step, context at the last step, batch size."""
    return t.cached_table(STEP_RANGES, """
        SELECT run_id, gen_id, min(step) AS lo, max(step) AS hi,
               arg_max(seq_len, step) AS last_seq_len, max(seq_len) AS max_seq_len,
               greatest(coalesce(arg_max(batch_size, step), 1), 1) AS batch_size
        FROM steps GROUP BY run_id, gen_id
    """)


def layer_summary(t: LoadedTraces) -> str:
    """One row per (run, generation, layer): growth fit over the steps, values at the last step."""
    ranges = step_ranges(t)
    x, y = "CAST(l.step AS DOUBLE)", "CAST(l.kv_bytes AS DOUBLE)"
    return t.cached_table(LAYER_SUMMARY, f"""
        WITH agg AS (
          SELECT l.run_id, l.gen_id, l.layer,
            {fit_aggregates(x, y, ("r.lo", "r.hi"))},
            max(l.step) AS last_step,
            arg_max(l.layer_type, l.step) AS layer_type,
            arg_max(l.kv_bytes, l.step) AS kv_bytes,
            arg_max(l.k_bytes, l.step) AS k_bytes,
            arg_max(l.v_bytes, l.step) AS v_bytes,
            arg_max(l.stored_tokens, l.step) AS stored_tokens,
            max(l.stored_tokens) AS max_stored_tokens,
            arg_max(l.capacity_tokens, l.step) AS capacity_tokens,
            arg_max(l.k_dtype, l.step) AS k_dtype,
            arg_max(l.aliased, l.step) AS aliased,
            max(l.kv_bytes) AS peak_kv_bytes
          FROM layers l LEFT JOIN {ranges} r ON l.run_id = r.run_id AND l.gen_id = r.gen_id
          GROUP BY l.run_id, l.gen_id, l.layer
        ), fit AS (
          SELECT agg.*, {FIT_DERIVED} FROM agg
        )
        SELECT fit.*, {R2_QUAD} AS r2_quad,
          coalesce(r.batch_size, 1) AS batch_size,
          r.last_seq_len, r.hi AS gen_last_step
        FROM fit LEFT JOIN {ranges} r ON fit.run_id = r.run_id AND fit.gen_id = r.gen_id
    """)


def step_fits(t: LoadedTraces) -> str:
    """One row per (run, generation): growth fit of the step totals (kv_bytes) on seq_len."""
    x, y = "CAST(s.seq_len AS DOUBLE)", "CAST(s.kv_bytes AS DOUBLE)"
    return t.cached_table(STEP_FITS, f"""
        WITH agg AS (
          SELECT s.run_id, s.gen_id,
            {fit_aggregates(x, y, ("r.seq_lo", "r.seq_hi"))},
            max(s.seq_len) AS max_seq_len, arg_max(s.kv_bytes, s.step) AS last_kv_bytes,
            max(s.kv_bytes) AS peak_kv_bytes
          FROM steps s JOIN (SELECT run_id, gen_id, min(seq_len) AS seq_lo, max(seq_len) AS seq_hi
                             FROM steps GROUP BY run_id, gen_id) r
            ON s.run_id = r.run_id AND s.gen_id = r.gen_id
          GROUP BY s.run_id, s.gen_id
        ), fit AS (SELECT agg.*, {FIT_DERIVED} FROM agg)
        SELECT fit.*, {R2_QUAD} AS r2_quad FROM fit
    """)
