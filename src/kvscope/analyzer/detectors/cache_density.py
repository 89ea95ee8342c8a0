"""cache_density: measured bytes per token per layer against what the geometry says.

expected = 2 × kv_heads × head_dim × dtype bytes (MLA latent: (kv_lora_rank + qk_rope_head_dim) ×
dtype bytes), from run.model_config; the dtype is the config's, else the stored k_dtype.
measured = kv_bytes / (batch × tokens held) at each layer's last step, where tokens held is the
preallocated capacity when there is one (unused capacity is preallocation_waste's business).
A generation is judged by the median over its layers of measured/expected, so one odd layer is
layer_anomaly's business; outside [low, high] means a wider dtype than the model's, duplicated
storage or a decompressed MLA cache (above), or aliased/quantised storage (below).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.geometry import dtype_bytes_sql, geometry
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import layer_summary
from kvscope.schema.layer_types import constant_types_sql

NAME = "cache_density"


@dataclass(frozen=True)
class Config:
    # Median measured/expected below this: the cache holds less than the geometry (aliased K/V,
    # quantised storage, a geometry the config misdescribes). Rounding alone never moves it 5%.
    low: float = 0.95
    # Median measured/expected above this: a wider dtype, duplicated storage, a decompressed MLA cache.
    high: float = 1.05


def _geometry_sql(t: LoadedTraces) -> tuple[str, dict[str, str]]:
    values, sources = [], {}
    for run_id, config, model_type in t.sql("SELECT run_id, model_config, model_type FROM run"):  # one per run
        geo = geometry(config, model_type)
        sources[run_id] = geo.source
        values.append("('{}', {}, {}, {})".format(
            run_id.replace("'", "''"),
            geo.elements_per_token if geo.elements_per_token is not None else "NULL",
            geo.dtype_bytes if geo.dtype_bytes is not None else "NULL",
            "true" if geo.latent else "false"))
    if not values:
        return ("SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS elems, NULL::DOUBLE AS cfg_bytes, "
                "NULL::BOOLEAN AS latent WHERE false"), sources
    return f"SELECT * FROM (VALUES {', '.join(values)}) v(run_id, elems, cfg_bytes, latent)", sources


def detect(t: LoadedTraces, cfg: Config) -> list[Finding]:
    summary = layer_summary(t)
    geo_sql, sources = _geometry_sql(t)
    rows = t.records(f"""
        WITH g AS ({geo_sql}),
        x AS (
          SELECT s.run_id, s.gen_id, s.layer, s.layer_type, s.k_dtype, s.aliased,
            s.kv_bytes::DOUBLE / s.batch_size / greatest(coalesce(s.capacity_tokens, s.stored_tokens), 1) AS measured,
            CAST(g.elems * coalesce(g.cfg_bytes, {dtype_bytes_sql('s.k_dtype')}) AS DOUBLE) AS expected, g.latent,
            g.cfg_bytes IS NULL AS dtype_from_trace
          FROM {summary} s JOIN g USING (run_id)
          WHERE greatest(coalesce(s.capacity_tokens, s.stored_tokens), 0) > 0
            AND s.layer_type NOT IN {constant_types_sql()}
        )
        SELECT run_id, gen_id, median(measured) AS measured, median(expected) AS expected,
          median(measured / expected) AS ratio, count(*) AS layers,
          list(DISTINCT k_dtype) AS dtypes, bool_or(latent) AS latent, count(*) FILTER (WHERE aliased) AS aliased, bool_or(dtype_from_trace) AS dtype_from_trace
        FROM x WHERE expected > 0 GROUP BY run_id, gen_id ORDER BY run_id, gen_id
    """)
    findings = []
    for r in rows:
        ok = cfg.low <= r["ratio"] <= cfg.high
        kind = "latent" if r["latent"] else "K+V"
        if ok:
            message = (f"{r['measured']:.0f} bytes ({human_bytes(r['measured'])}) per token per layer, as the "
                       f"geometry expects ({r['expected']:.0f} bytes, ratio {r['ratio']:.2f}); nothing to do.")
        elif r["ratio"] > cfg.high:
            message = (f"the cache holds {r['ratio']:.2f}x the geometry's {kind} bytes per token per layer "
                       f"({human_bytes(r['measured'])} vs {human_bytes(r['expected'])}, dtypes "
                       f"{', '.join(r['dtypes'])}): check the cache dtype, duplicated storage or a decompressed MLA cache.")
        else:
            message = (f"the cache holds only {r['ratio']:.2f}x the geometry's {kind} bytes per token per layer "
                       f"({human_bytes(r['measured'])} vs {human_bytes(r['expected'])}): K and V share storage, "
                       "the cache is quantised, or run.model_config misdescribes the model.")
        findings.append(Finding(
            NAME, "info" if ok else "warning", r["run_id"], r["gen_id"], None, "bytes_per_token_per_layer",
            r["measured"], r["expected"], message,
            {"ratio": r["ratio"], "expected_bytes_per_token": r["expected"], "band": [cfg.low, cfg.high],
             "layers": r["layers"], "dtypes": r["dtypes"], "latent": r["latent"], "aliased_layers": r["aliased"],
             "expected_from": sources.get(r["run_id"]), "dtype_from_trace": r["dtype_from_trace"]},
        ))
    return findings


DETECTOR = Detector(NAME, Config, detect, "bytes per token per layer against the geometry's expectation")
