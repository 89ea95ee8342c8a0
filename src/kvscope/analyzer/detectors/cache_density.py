"""cache_density: measured bytes per token per layer against what the geometry says.

expected = 2 × kv_heads × head_dim × dtype bytes (MLA latent: (kv_lora_rank + qk_rope_head_dim) ×
dtype bytes; a layer `per_layer_config` overrides, or Gemma 4's full_attention layers with
`global_head_dim`, from its own head_dim and kv heads), from
run.model_config; the dtype is the config's, else the stored k_dtype. The finding also gives the
median per layer type.
measured = kv_bytes / (batch × tokens held) at each layer's last step, where tokens held is the
preallocated capacity when there is one (unused capacity is preallocation_waste's business).
A generation is judged by the median over its layers of measured/expected, so one odd layer is
layer_anomaly's business; outside [low, high] means a wider dtype than the model's, duplicated
storage or a decompressed MLA cache (above), or aliased/quantised storage (below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kvscope.analyzer.engine import Engine, arrow_table
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.geometry import dtype_bytes_sql, geometry
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


GEOMETRY = "_kvscope_geometry"
LAYER_GEOMETRY = "_kvscope_layer_geometry"


@dataclass(frozen=True)
class Measured:
    """Per (run, generation) with layers and a known geometry, ordered: median measured and expected
    bytes per token per layer and their ratio, layers, dtypes (sorted), aliased layers; and how each
    run's expectation was derived."""

    generations: list[dict[str, Any]]
    sources: dict[str, str]


def geometry_table(t: Engine) -> tuple[str, str, dict[str, str]]:
    """Register each run's expected elements and config dtype bytes per token per layer (Python,
    from run.model_config) as a table, and the layers whose config overrides them as another;
    return both names and how each run's expectation was derived."""
    runs, elems, sizes, latent, sources = [], [], [], [], {}
    layer_runs, layer_index, layer_elems = [], [], []
    for r in t.records("SELECT run_id, model_config, model_type, layer_types FROM run ORDER BY run_id"):  # one per run
        geo = geometry(r["model_config"], r["model_type"], r["layer_types"])
        sources[r["run_id"]] = geo.source
        runs.append(r["run_id"])
        elems.append(geo.elements_per_token)
        sizes.append(None if geo.dtype_bytes is None else float(geo.dtype_bytes))
        latent.append(bool(geo.latent))
        for layer, n in geo.layer_elements:
            layer_runs.append(r["run_id"])
            layer_index.append(layer)
            layer_elems.append(n)
    table = arrow_table({"run_id": (pa.string(), runs), "elems": (pa.int64(), elems),
                         "cfg_bytes": (pa.float64(), sizes), "latent": (pa.bool_(), latent)})
    layers = arrow_table({"run_id": (pa.string(), layer_runs), "layer": (pa.int64(), layer_index),
                          "elems": (pa.int64(), layer_elems)})
    return t.register_rows(GEOMETRY, table), t.register_rows(LAYER_GEOMETRY, layers), sources


def measure(t: Engine) -> Measured:
    summary = layer_summary(t)
    geo, layer_geo, sources = geometry_table(t)
    x_sql = f"""
          SELECT s.run_id, s.gen_id, s.layer, s.layer_type, s.k_dtype, s.aliased,
            -- a dynamic layer is judged by the smaller of its unique and its logical K/V bytes: unique
            -- bytes beyond the tensors' own are a hybrid layer's recurrent state (falcon_h1, zamba2:
            -- constant in the tokens) or, at the prefill, a sliding layer's view of the whole prompt
            CAST(CASE WHEN s.capacity_tokens IS NULL THEN least(s.kv_bytes, coalesce(s.logical_bytes, s.kv_bytes))
                      ELSE s.kv_bytes END AS DOUBLE) / s.batch_size
              / greatest(coalesce(s.capacity_tokens, s.stored_tokens), 1) AS measured,
            CAST(coalesce(o.elems, g.elems) * coalesce(g.cfg_bytes, {dtype_bytes_sql('s.k_dtype')}) AS DOUBLE)
              AS expected, g.latent,
            g.cfg_bytes IS NULL AS dtype_from_trace
          FROM {summary} s JOIN {geo} g ON s.run_id = g.run_id
            LEFT JOIN {layer_geo} o ON s.run_id = o.run_id AND s.layer = o.layer
          WHERE greatest(coalesce(s.capacity_tokens, s.stored_tokens), 0) > 0
            AND s.layer_type NOT IN {constant_types_sql()}
    """
    rows = t.records(f"""
        WITH x AS ({x_sql})
        SELECT run_id, gen_id, median(measured) AS measured, median(expected) AS expected,
          median(measured / expected) AS ratio, count(*) AS layers,
          list(DISTINCT k_dtype) AS dtypes, bool_or(latent) AS latent, count(*) FILTER (WHERE aliased) AS aliased,
          bool_or(dtype_from_trace) AS dtype_from_trace
        FROM x WHERE expected > 0 GROUP BY run_id, gen_id ORDER BY run_id, gen_id
    """)
    by_type: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in t.records(f"""
        WITH x AS ({x_sql})
        SELECT run_id, gen_id, layer_type, median(measured) AS measured, median(expected) AS expected,
          count(*) AS layers
        FROM x WHERE expected > 0 GROUP BY run_id, gen_id, layer_type ORDER BY run_id, gen_id, layer_type
    """):
        by_type.setdefault((r["run_id"], r["gen_id"]), []).append(
            {"layer_type": r["layer_type"], "measured": r["measured"], "expected": r["expected"], "layers": r["layers"]})
    return Measured([{**r, "dtypes": sorted(r["dtypes"]), "by_layer_type": by_type.get((r["run_id"], r["gen_id"]), [])}
                     for r in rows], sources)


def judge(m: Measured, cfg: Config) -> list[Finding]:
    sources = m.sources
    findings = []
    for r in m.generations:
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
        types = r["by_layer_type"]
        if len(types) > 1:  # e.g. Gemma 4: sliding and full layers of different head sizes
            parts = [f"{x['layers']} {x['layer_type']} {human_bytes(x['measured'])} (geometry "
                     f"{human_bytes(x['expected'])})" for x in types]
            message = message.rstrip(".") + "; by layer type: " + ", ".join(parts) + "."
        findings.append(Finding(
            NAME, "info" if ok else "warning", r["run_id"], r["gen_id"], None, "bytes_per_token_per_layer",
            r["measured"], r["expected"], message,
            {"ratio": r["ratio"], "expected_bytes_per_token": r["expected"], "band": [cfg.low, cfg.high],
             "layers": r["layers"], "dtypes": r["dtypes"], "latent": r["latent"], "aliased_layers": r["aliased"],
             "expected_from": sources.get(r["run_id"]), "dtype_from_trace": r["dtype_from_trace"],
             "by_layer_type": types},
        ))
    return findings


DETECTOR = Detector(NAME, Config, summary="bytes per token per layer against the geometry's expectation",
                    measure=measure, judge=judge)
