"""layer_uniformity: how evenly the cache is spread over the layers, and in which modes.

At each generation's last step: the coefficient of variation (population) of per-layer KV bytes,
and the layers grouped into modes (sorted bytes, a new mode wherever a layer holds more than
`mode_gap` times the previous one). gpt-oss has two modes 1:1 (sliding, full), Gemma 3 5:1.
Always an info finding; a warning when the modes disagree with the declared layer_types: layers
declared sliding that hold more tokens than the window (they never saturate). Layers that own no
cache (Gemma 3n/4 KV-shared layers reuse an earlier layer's keys and values) are not counted: the
message says how many of the model's layers hold a cache and how many are KV-shared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import reduce

from kvscope.analyzer.findings import Finding, bytes_in_unit_of, layer_list
from kvscope.analyzer.geometry import parse_config
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import layer_summary
from kvscope.schema.layer_types import constant_types_sql

NAME = "layer_uniformity"


@dataclass(frozen=True)
class Config:
    # Adjacent layers (sorted by bytes) further apart than this ratio start a new mode; a sliding
    # layer at its window and a full layer differ by context/window, far more than 1.5x.
    mode_gap: float = 1.5
    # A group of fewer layers is an outlier (layer_anomaly's business), not a mode.
    min_mode_layers: int = 2
    # Slack on the window: a declared sliding layer holding more than window + this many tokens
    # has not saturated.
    window_slack_tokens: int = 1


def _windows(t: LoadedTraces) -> str:
    """A VALUES list of (run_id, sliding_window, declared layer_types JSON, model layers, KV-shared
    layers) from the run table."""
    rows = t.sql("SELECT run_id, model_config, layer_types, num_layers FROM run")
    values = []
    for run_id, config, declared, num_layers in rows:  # one row per run
        parsed = parse_config(config)
        window = parsed.get("sliding_window")
        window = int(window) if isinstance(window, (int, float)) and not isinstance(window, bool) else None
        shared = parsed.get("num_kv_shared_layers")
        shared = int(shared) if isinstance(shared, int) and not isinstance(shared, bool) and shared > 0 else None
        values.append(f"('{run_id.replace(chr(39), chr(39) * 2)}', {window if window else 'NULL'}, "
                      f"'{json.dumps(list(declared or [])).replace(chr(39), chr(39) * 2)}', "
                      f"{int(num_layers) if num_layers else 'NULL'}, {shared or 'NULL'})")
    if not values:
        return ("SELECT NULL::VARCHAR AS run_id, NULL::BIGINT AS sliding_window, NULL::VARCHAR AS declared, "
                "NULL::BIGINT AS model_layers, NULL::BIGINT AS kv_shared WHERE false")
    return (f"SELECT * FROM (VALUES {', '.join(values)}) "
            "v(run_id, sliding_window, declared, model_layers, kv_shared)")


def detect(t: LoadedTraces, cfg: Config) -> list[Finding]:
    summary = layer_summary(t)
    rows = t.records(f"""
        WITH w AS ({_windows(t)}),
        x AS (
          SELECT s.run_id, s.gen_id, s.layer, s.kv_bytes, s.stored_tokens, s.last_seq_len, w.sliding_window,
            w.model_layers, w.kv_shared,
            coalesce(json_extract_string(w.declared, '$[' || s.layer || ']'), s.layer_type) AS declared_type
          FROM {summary} s LEFT JOIN w USING (run_id)
          WHERE s.layer_type NOT IN {constant_types_sql()}
        ), o AS (
          SELECT *, CASE WHEN kv_bytes > {cfg.mode_gap} * lag(kv_bytes) OVER g THEN 1 ELSE 0 END AS jump
          FROM x WINDOW g AS (PARTITION BY run_id, gen_id ORDER BY kv_bytes, layer)
        ), m AS (
          SELECT *, sum(jump) OVER (PARTITION BY run_id, gen_id ORDER BY kv_bytes, layer) AS mode FROM o
        ), modes AS (
          SELECT run_id, gen_id, mode, count(*) AS n, median(kv_bytes) AS bytes, list(layer ORDER BY layer) AS layers,
            list(DISTINCT declared_type ORDER BY declared_type) AS types
          FROM m GROUP BY ALL
        ), stats AS (
          SELECT run_id, gen_id, count(*) AS layers, stddev_pop(kv_bytes) / nullif(avg(kv_bytes), 0) AS cv,
            max(last_seq_len) AS context, any_value(sliding_window) AS sliding_window,
            any_value(model_layers) AS model_layers, any_value(kv_shared) AS kv_shared,
            list(layer ORDER BY layer) FILTER (WHERE declared_type LIKE '%sliding%' AND sliding_window IS NOT NULL
              AND greatest(coalesce(last_seq_len, 0), stored_tokens) > sliding_window + {int(cfg.window_slack_tokens)}
              AND stored_tokens > sliding_window + {int(cfg.window_slack_tokens)}) AS unsaturated
          FROM m GROUP BY ALL
        )
        SELECT stats.*, list({{'n': modes.n, 'bytes': modes.bytes, 'layers': modes.layers, 'types': modes.types}}
                             ORDER BY modes.bytes) AS modes
        FROM stats JOIN modes USING (run_id, gen_id) GROUP BY ALL ORDER BY run_id, gen_id
    """)
    findings: list[Finding] = []
    for r in rows:
        modes = [m for m in r["modes"] if m["n"] >= cfg.min_mode_layers]
        outliers = [layer for m in r["modes"] if m["n"] < cfg.min_mode_layers for layer in m["layers"]]
        divisor = reduce(math.gcd, [m["n"] for m in modes]) if modes else 1
        ratio = ":".join(str(m["n"] // divisor) for m in modes)
        largest = max((m["bytes"] for m in modes), default=0.0)
        described = ", ".join(f"{m['n']} at {bytes_in_unit_of(m['bytes'], largest)} ({'/'.join(m['types'])})"
                              for m in modes)
        evidence = {"modes": [{"layers": m["layers"], "count": m["n"], "bytes": m["bytes"], "mib": m["bytes"] / 2**20,
                               "types": m["types"]} for m in modes],
                    "mode_ratio": ratio, "outlier_layers": outliers, "context_tokens": r["context"],
                    "sliding_window": r["sliding_window"], "cache_layers": r["layers"],
                    "model_layers": r["model_layers"], "kv_shared_layers": r["kv_shared"]}
        over = f"{r['layers']} layers"
        if r["model_layers"] and r["model_layers"] > r["layers"]:
            without = r["model_layers"] - r["layers"]
            why = (f"{without} KV-shared layers reuse an earlier layer's cache" if r["kv_shared"] == without
                   else f"{without} hold no cache")
            over = f"the {r['layers']} layers that hold a cache (of the model's {r['model_layers']}: {why})"
        findings.append(Finding(
            NAME, "info", r["run_id"], r["gen_id"], None, "cv", r["cv"] if r["cv"] is not None else 0.0, None,
            f"per-layer KV bytes vary with CV {r['cv'] or 0:.2f} over {over} in {len(modes)} "
            f"mode{'s' if len(modes) != 1 else ''} ({described}; ratio {ratio}); for information.",
            evidence,
        ))
        unsaturated = r["unsaturated"] or []
        if unsaturated:
            findings.append(Finding(
                NAME, "warning", r["run_id"], r["gen_id"], unsaturated[0] if len(unsaturated) == 1 else None,
                "unsaturated_sliding_layers", len(unsaturated), 0,
                f"layer{'s' if len(unsaturated) > 1 else ''} {layer_list(unsaturated)} declared sliding "
                f"(window {r['sliding_window']}) hold more tokens than the window at {r['context']} tokens of "
                "context: the cache keeps them whole, so use a cache class that honours the sliding window.",
                {**evidence, "unsaturated_layers": unsaturated},
            ))
    return findings


DETECTOR = Detector(NAME, Config, detect, "per-layer KV bytes CV and modes; declared sliding layers that never saturate")
