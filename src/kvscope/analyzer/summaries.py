"""Per-generation and per-layer summaries that several detectors share, each one SQL scan.

`layer_summary` reads the `layers` table once and keeps, per (run, generation, layer), the
least-squares sums of a linear and a quadratic fit of kv_bytes on the step, the slopes over the
first and last quarter of the generation, and the values at the layer's last step. It is a small
temporary table (one row per generation and layer) that growth_curve, layer_anomaly,
layer_uniformity, cache_density and preallocation_waste all read, so a trace of millions of layer
rows is scanned once however many detectors run.
"""

from __future__ import annotations

from kvscope.analyzer.engine import Engine

STEP_RANGES = "_kvscope_step_ranges"
LAYER_SUMMARY = "_kvscope_layer_summary"
STEP_FITS = "_kvscope_step_fits"
DECODE_FITS = "_kvscope_decode_step_fits"
GENERATION_SCORES = "_kvscope_generation_scores"


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


def step_ranges(t: Engine) -> str:
    """Per (run, generation): first and last step, context at the last step, batch size."""
    return t.cached_table(STEP_RANGES, """
        SELECT run_id, gen_id, min(step) AS lo, max(step) AS hi,
               arg_max(seq_len, step) AS last_seq_len, max(seq_len) AS max_seq_len,
               greatest(coalesce(arg_max(batch_size, step), 1), 1) AS batch_size
        FROM steps GROUP BY run_id, gen_id
    """)


def _centred(prefix: str = "") -> str:
    """Centred moments and fits from the raw sums n, sx, sxx, sxxx, sxxxx, sy, sxy, sxxy, syy.

    x is the step counted from the generation's first step, so its sums stay small and exact;
    a variance of y below 1e-12 of its squared mean is rounding, i.e. a flat curve.
    """
    return f"""
      {prefix}sxx / n - ({prefix}sx / n) * ({prefix}sx / n) AS vxx,
      {prefix}sxxx / n - ({prefix}sx / n) * ({prefix}sxx / n) AS vxq,
      {prefix}sxxxx / n - ({prefix}sxx / n) * ({prefix}sxx / n) AS vqq,
      {prefix}sxy / n - ({prefix}sx / n) * ({prefix}sy / n) AS cxy,
      {prefix}sxxy / n - ({prefix}sxx / n) * ({prefix}sy / n) AS cqy,
      CASE WHEN {prefix}syy / n - ({prefix}sy / n) * ({prefix}sy / n) > 1e-12 * ({prefix}sy / n) * ({prefix}sy / n)
           THEN {prefix}syy / n - ({prefix}sy / n) * ({prefix}sy / n) ELSE 0 END AS vyy"""


def _quarter_slope(k: int) -> str:
    return (f"CASE WHEN n{k} >= 2 AND n{k} * sxx{k} - sx{k} * sx{k} > 0 "
            f"THEN (n{k} * sxy{k} - sx{k} * sy{k}) / (n{k} * sxx{k} - sx{k} * sx{k}) END")


def layer_summary(t: Engine, decode_only: bool = False) -> str:
    """One row per (run, generation, layer): growth fit over the steps, values at the last step.

    One scan of `layers`, grouped by (run, generation, layer, quarter of the generation): raw
    least-squares sums per bucket (which add up to the whole curve's) and the values at the
    bucket's last step; a second, tiny aggregation combines the three buckets. `decode_only` fits
    steps ≥ 1: at step 0 a dynamic sliding layer's cache is a view of the whole prompt's storage
    (see decode_step_fits), a drop to the window at step 1 that a fit reads as
    curvature when the generation is short.
    """
    ranges = step_ranges(t)
    lo = "greatest(r.lo, 1)" if decode_only else "r.lo"
    where = "WHERE l.step >= 1" if decode_only else ""
    sums = ", ".join(f"sum({e}) AS {n}" for n, e in (
        ("sx", "x"), ("sxx", "x * x"), ("sxxx", "x * x * x"), ("sxxxx", "x * x * x * x"), ("sy", "y"),
        ("sxy", "x * y"), ("sxxy", "x * x * y"), ("syy", "y * y")))
    combined = ", ".join(f"sum({n}) AS {n}" for n in ("sx", "sxx", "sxxx", "sxxxx", "sy", "sxy", "sxxy", "syy"))
    quarters = ", ".join(f"sum({n}) FILTER (WHERE qt = {k}) AS {n}{k}" for k in (1, 2)
                         for n in ("n", "sx", "sxx", "sy", "sxy"))
    return t.cached_table(LAYER_SUMMARY + ("_decode" if decode_only else ""), f"""
        WITH lrows AS (
          SELECT l.run_id, l.gen_id, l.layer, l.step, l.kv_bytes, l.stored_tokens, l.layer_type, l.k_dtype,
            l.capacity_tokens, l.aliased, l.k_bytes + l.v_bytes AS logical_bytes,
            CAST(l.step - coalesce({lo}, 0) AS DOUBLE) AS x, CAST(l.kv_bytes AS DOUBLE) AS y,
            CASE WHEN r.lo IS NULL THEN 0
                 WHEN l.step <= {lo} + (r.hi - {lo}) * 0.25 THEN 1
                 WHEN l.step >= r.hi - (r.hi - {lo}) * 0.25 THEN 2 ELSE 0 END AS qt
          FROM layers l LEFT JOIN {ranges} r ON l.run_id = r.run_id AND l.gen_id = r.gen_id
          {where}
        ), buckets AS (
          SELECT run_id, gen_id, layer, qt, count(*) AS n, {sums},
            min(x) AS x_lo, max(x) AS x_hi, max(step) AS last_step,
            arg_max({{'kv_bytes': kv_bytes, 'stored_tokens': stored_tokens, 'capacity_tokens': capacity_tokens,
                     'aliased': aliased, 'logical_bytes': logical_bytes}}, step) AS last,
            any_value(layer_type) AS layer_type, any_value(k_dtype) AS k_dtype
          FROM lrows GROUP BY run_id, gen_id, layer, qt
        ), g AS (
          SELECT run_id, gen_id, layer, sum(n) AS n, {combined}, {quarters},
            min(x_lo) AS x_lo, max(x_hi) AS x_hi, max(last_step) AS last_step,
            arg_max(last, last_step) AS last, arg_max(layer_type, last_step) AS layer_type,
            arg_max(k_dtype, last_step) AS k_dtype
          FROM buckets GROUP BY run_id, gen_id, layer
        ), c AS (
          SELECT run_id, gen_id, layer, n, x_lo, x_hi, last_step, layer_type, k_dtype, last.kv_bytes AS kv_bytes,
            last.stored_tokens AS stored_tokens, last.capacity_tokens AS capacity_tokens, last.aliased AS aliased,
            last.logical_bytes AS logical_bytes,
            sx / n AS x_mean, sy / n AS y_mean, {_quarter_slope(1)} AS slope_first, {_quarter_slope(2)} AS slope_last,
            {_centred()}
          FROM g
        ), fit AS (
          SELECT c.*,
            CASE WHEN vxx > 0 THEN cxy / vxx END AS slope,
            CASE WHEN vxx > 0 THEN y_mean - cxy / vxx * x_mean END AS intercept,
            CASE WHEN vxx > 0 AND vyy > 0 THEN least(1.0, cxy * cxy / (vxx * vyy)) END AS r2_lin,
            {FIT_DERIVED}
          FROM c
        )
        SELECT fit.*, {R2_QUAD} AS r2_quad,
          coalesce(r.batch_size, 1) AS batch_size, r.last_seq_len, r.hi AS gen_last_step
        FROM fit LEFT JOIN {ranges} r ON fit.run_id = r.run_id AND fit.gen_id = r.gen_id
    """)


def step_fits(t: Engine) -> str:
    """One row per (run, generation): growth fit of the step totals (kv_bytes) on seq_len."""
    return _step_total_fits(t, STEP_FITS, first_step=0)


def decode_step_fits(t: Engine) -> str:
    """One row per (run, generation): fit of the step totals (kv_bytes) on seq_len, decode steps only.

    At step 0 a dynamic sliding layer's cache is a view of the freshly concatenated prefill, so its
    storage holds the whole prompt until the next step (transformers 4.56+): on an H200 recording of
    a gpt-oss-20b twin with a 200-token prompt the step total drops 1.5 MB from step 0 to step 1,
    which a fit over every step reads as a convex curve (marginal rate x1.56) on a healthy run.
    """
    return _step_total_fits(t, DECODE_FITS, first_step=1)


def _step_total_fits(t: Engine, name: str, first_step: int) -> str:
    x, y = "CAST(s.seq_len AS DOUBLE)", "CAST(s.kv_bytes AS DOUBLE)"
    return t.cached_table(name, f"""
        WITH d AS (SELECT * FROM steps WHERE step >= {int(first_step)}), agg AS (
          SELECT s.run_id, s.gen_id,
            {fit_aggregates(x, y, ("r.seq_lo", "r.seq_hi"))},
            max(s.seq_len) AS max_seq_len, arg_max(s.kv_bytes, s.step) AS last_kv_bytes,
            max(s.kv_bytes) AS peak_kv_bytes
          FROM d s JOIN (SELECT run_id, gen_id, min(seq_len) AS seq_lo, max(seq_len) AS seq_hi
                         FROM d GROUP BY run_id, gen_id) r
            ON s.run_id = r.run_id AND s.gen_id = r.gen_id
          GROUP BY s.run_id, s.gen_id
        ), fit AS (SELECT agg.*, {FIT_DERIVED} FROM agg)
        SELECT fit.*, {R2_QUAD} AS r2_quad FROM fit
    """)


_MEMORY = """
    SELECT run_id, gen_id,
      peak_allocated_bytes - baseline_allocated_bytes AS alloc_growth,
      post_empty_cache_allocated_bytes - baseline_allocated_bytes AS live_bytes,
      (post_empty_cache_reserved_bytes - post_empty_cache_allocated_bytes)
        - (baseline_reserved_bytes - baseline_allocated_bytes) AS pool_bytes,
      (post_empty_cache_nvml_used_bytes - post_empty_cache_reserved_bytes)
        - (baseline_nvml_used_bytes - baseline_reserved_bytes) AS outside_bytes,
      greatest(peak_reserved_bytes - baseline_reserved_bytes, 0) AS reserved_growth,
      greatest(peak_nvml_used_bytes - baseline_nvml_used_bytes, 0) AS nvml_growth,
      post_empty_cache_nvml_used_bytes - baseline_nvml_used_bytes AS nvml_bytes,
      post_empty_cache_allocated_bytes AS post_alloc, baseline_allocated_bytes AS base_alloc,
      row_number() OVER (PARTITION BY run_id ORDER BY gen_id) - 1 AS ordinal,
      count(*) OVER (PARTITION BY run_id) AS gens
    FROM generations
"""


def generation_scores(t: Engine) -> str:
    """One row per (run, generation): memory left above the baseline after the generation, per cause.

    live tensors (allocated), allocator pools (reserved − allocated) and memory outside the
    allocator (NVML used − reserved), in bytes and as a fraction of what the generation added at
    its peak (`live`, `pools`, `outside`, `nvml_score`); `post_live_rises`: allocated after this
    generation above the previous one's. post_eos judges these rows; diff and fleet quote them.
    """
    def frac(num: str, den: str) -> str:
        return f"CASE WHEN {den} > 0 THEN CAST({num} AS DOUBLE) / {den} END"

    return t.cached_table(GENERATION_SCORES, f"""
        SELECT *, {frac('live_bytes', 'alloc_growth')} AS live,
          {frac('pool_bytes', 'coalesce(nullif(reserved_growth, 0), alloc_growth)')} AS pools,
          {frac('outside_bytes', 'coalesce(nullif(nvml_growth, 0), reserved_growth)')} AS outside,
          {frac('nvml_bytes', 'nvml_growth')} AS nvml_score
        FROM (SELECT *, post_alloc > coalesce(lag(post_alloc) OVER (PARTITION BY run_id ORDER BY gen_id), base_alloc)
                        AS post_live_rises FROM ({_MEMORY}) m) g
    """)
