"""layer_anomaly: a layer that stores more (or fewer) bytes per token than its peers.

At each generation's last step, bytes per stored token of every layer, compared within the layers
of the same layer_type with a robust z-score: z = (x − median) / (1.4826 · MAD). The median and
MAD let a 4-layer model flag its one odd layer; when the peers are identical (MAD = 0) the scale
falls back to `min_relative_scale` of the median, so a 2x layer scores 100, not infinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import layer_summary
from kvscope.schema.layer_types import constant_types_sql

NAME = "layer_anomaly"


@dataclass(frozen=True)
class Config:
    # |z| above which a layer is anomalous: three robust standard deviations from its peers.
    z_threshold: float = 3.0
    # Layers of a type needed for a comparison (with fewer, there is no majority to compare with).
    min_layers: int = 3
    # Floor of the robust scale as a fraction of the median, so identical peers give a finite z.
    min_relative_scale: float = 0.01


@dataclass(frozen=True)
class Measured:
    """Per (run, generation, layer) holding tokens, ordered: bytes per stored token (`bpt`) and its
    layer type's median (`med`), median absolute deviation (`mad`) and number of layers (`peers`)."""

    layers: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    summary = layer_summary(t)
    return Measured(t.records(f"""
        WITH x AS (
          SELECT run_id, gen_id, layer, layer_type, k_dtype, kv_bytes, stored_tokens,
                 CAST(kv_bytes AS DOUBLE) / stored_tokens / batch_size AS bpt
          FROM {summary} WHERE stored_tokens > 0
            AND layer_type NOT IN {constant_types_sql()}
        ), m AS (
          SELECT run_id, gen_id, layer_type, median(bpt) AS med, count(*) AS peers FROM x
          GROUP BY run_id, gen_id, layer_type
        ), d AS (
          SELECT x.*, m.med, m.peers, abs(x.bpt - m.med) AS dev
          FROM x JOIN m USING (run_id, gen_id, layer_type)
        ), mad AS (
          SELECT run_id, gen_id, layer_type, median(dev) AS mad FROM d GROUP BY run_id, gen_id, layer_type
        )
        SELECT d.*, mad.mad FROM d JOIN mad USING (run_id, gen_id, layer_type) ORDER BY run_id, gen_id, layer
    """))


def robust_z(r: dict[str, Any], cfg: Config) -> float:
    """(x − median) / (1.4826 · MAD), the scale floored at min_relative_scale of the median."""
    return (r["bpt"] - r["med"]) / max(1.4826 * r["mad"], cfg.min_relative_scale * r["med"], 1e-12)


def judge(m: Measured, cfg: Config) -> list[Finding]:
    rows = [{**r, "z": robust_z(r, cfg)} for r in m.layers if r["peers"] >= cfg.min_layers]
    rows = [r for r in rows if abs(r["z"]) > cfg.z_threshold]
    return [Finding(
        NAME, "warning", r["run_id"], r["gen_id"], r["layer"], "robust_z", r["z"], cfg.z_threshold,
        f"layer {r['layer']} ({r['layer_type']}, {r['k_dtype']}) holds {human_bytes(r['bpt'])} per token, "
        f"{r['bpt'] / r['med']:.2f}x the median of the {r['peers']} {r['layer_type']} layers ({human_bytes(r['med'])}); check its "
        "cache dtype, duplicated storage or a layer-specific cache class.",
        {"bytes_per_token": r["bpt"], "peer_median": r["med"], "peer_mad": r["mad"], "peers": r["peers"],
         "layer_type": r["layer_type"], "k_dtype": r["k_dtype"], "ratio_to_median": r["bpt"] / r["med"]},
    ) for r in rows]


DETECTOR = Detector(NAME, Config, summary="a layer whose bytes per token differ from its peers' (robust z)",
                    measure=measure, judge=judge)
