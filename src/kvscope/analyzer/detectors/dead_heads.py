"""dead_heads: kv heads whose key AND value norms stay near zero at every sampled step.

Reads head_stats (`kvscope kernels` offline, or the recorder online): per (run, layer, kv head),
the largest per-token key and value norm over all samples. A head is dead when both are at most
`relative_threshold` times the layer's median head (mean norms), or below `absolute_threshold`.
Key norm alone is a weak signal (low-norm keys can draw attention); a head with no value signal
either contributes nothing to the output. Its share of the layer's cache is wasted memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector

NAME = "dead_heads"


@dataclass(frozen=True)
class Config:
    # Largest key and value norm of a head, over all samples, at most this fraction of the layer's
    # median head's mean norm: dead. Live heads of trained and random models sit within ~3x of it.
    relative_threshold: float = 0.05
    # Norms at or below this are dead whatever the layer's median (zeroed projections).
    absolute_threshold: float = 1e-6


_QUERY = """
    WITH s AS (
      SELECT run_id, layer, head,
        max(value) FILTER (WHERE stat = 'key_norm_max') AS k_max,
        max(value) FILTER (WHERE stat = 'value_norm_max') AS v_max,
        avg(value) FILTER (WHERE stat = 'key_norm_mean') AS k_mean,
        avg(value) FILTER (WHERE stat = 'value_norm_mean') AS v_mean,
        count(*) FILTER (WHERE stat = 'key_norm_max') AS samples
      FROM head_stats
      WHERE stat IN ('key_norm_max', 'value_norm_max', 'key_norm_mean', 'value_norm_mean')
      GROUP BY run_id, layer, head
    ), l AS (
      SELECT run_id, layer, median(k_mean) AS k_med, median(v_mean) AS v_med, count(*) AS heads
      FROM s GROUP BY run_id, layer
    ), b AS (
      SELECT run_id, layer, max(kv_bytes) AS kv_bytes FROM layers GROUP BY run_id, layer
    )
    SELECT s.*, l.k_med, l.v_med, l.heads, b.kv_bytes
    FROM s JOIN l USING (run_id, layer) LEFT JOIN b USING (run_id, layer)
    WHERE s.k_max IS NOT NULL AND s.v_max IS NOT NULL
    ORDER BY run_id, layer, head
"""


def _near_zero(value: float, median: float | None, cfg: Config) -> bool:
    if value <= cfg.absolute_threshold:
        return True
    return median is not None and median > 0 and value <= cfg.relative_threshold * median


@dataclass(frozen=True)
class Measured:
    """Per (run, layer, kv head) with norms, ordered: largest and mean key/value norms, the layer's
    median head and its cache bytes (empty without head_stats)."""

    heads: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    return Measured(t.records(_QUERY) if t.num_rows("head_stats") else [])


def judge(m: Measured, cfg: Config) -> list[Finding]:
    dead: dict[tuple[str, int], list[dict]] = {}
    for r in m.heads:
        if _near_zero(r["k_max"], r["k_med"], cfg) and _near_zero(r["v_max"], r["v_med"], cfg):
            dead.setdefault((r["run_id"], r["layer"]), []).append(r)
    findings = []
    for (run_id, layer), rows in dead.items():
        heads = [int(r["head"]) for r in rows]
        total_heads = int(rows[0]["heads"])
        kv_bytes = rows[0]["kv_bytes"]
        wasted = kv_bytes * len(heads) / total_heads if kv_bytes else None
        worst = max(max(r["k_max"], r["v_max"]) for r in rows)
        waste = f", {human_bytes(wasted)} of its cache at the largest step" if wasted else ""
        findings.append(Finding(
            NAME, "warning", run_id, None, layer, "dead_kv_heads", len(heads), cfg.relative_threshold,
            f"kv head(s) {', '.join(map(str, heads))} of layer {layer} have key and value norms near zero at every "
            f"sampled step (largest {worst:.3g}; layer median key {rows[0]['k_med']:.3g}, value {rows[0]['v_med']:.3g}): "
            f"they hold {len(heads)}/{total_heads} of the layer's cache for nothing{waste}; prune them or check "
            "the checkpoint's k/v projection weights.",
            {"heads": heads, "kv_heads": total_heads, "key_norm_max": [r["k_max"] for r in rows],
             "value_norm_max": [r["v_max"] for r in rows], "layer_median_key_norm": rows[0]["k_med"],
             "layer_median_value_norm": rows[0]["v_med"], "samples": [r["samples"] for r in rows],
             "wasted_bytes": wasted},
        ))
    return findings


DETECTOR = Detector(NAME, Config, summary="kv heads whose key and value norms stay near zero (head_stats)",
                    measure=measure, judge=judge)
