"""eviction_headroom: cached tokens whose attention mass stays low, i.e. bytes eviction could free.

Reads head_stats `low_mass_fraction` (per kv head: the fraction of cached keys whose mean
attention probability, normalised by the queries that can see them, is below a fraction of a
uniform share; written by `kvscope kernels` from q/k samples). A head's headroom is its smallest
fraction over the sampled steps (the tokens that stay below); a layer's is the mean over heads,
weighted into bytes by the layer's cache at its last step. An opportunity, not a fault: info.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector

NAME = "eviction_headroom"


@dataclass(frozen=True)
class Config:
    # Report a generation when at least this fraction of its cached bytes could be evicted.
    min_fraction: float = 0.25


_QUERY = """
    WITH h AS (
      SELECT run_id, gen_id, layer, head, min(value) AS low, count(*) AS samples, max(tokens) AS tokens
      FROM head_stats WHERE stat = 'low_mass_fraction' GROUP BY run_id, gen_id, layer, head
    ), l AS (
      SELECT run_id, gen_id, layer, avg(low) AS fraction, count(*) AS heads, min(samples) AS samples,
        max(tokens) AS tokens
      FROM h GROUP BY run_id, gen_id, layer
    ), b AS (
      SELECT run_id, gen_id, layer, arg_max(kv_bytes, step) AS kv_bytes FROM layers GROUP BY run_id, gen_id, layer
    )
    SELECT l.*, b.kv_bytes FROM l LEFT JOIN b USING (run_id, gen_id, layer) ORDER BY run_id, gen_id, layer
"""


@dataclass(frozen=True)
class Measured:
    """Per (run, generation, layer), ordered: mean low-mass fraction over heads and the layer's
    cache bytes at its last step (empty without head_stats)."""

    layers: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    return Measured(t.records(_QUERY) if t.num_rows("head_stats") else [])


def judge(m: Measured, cfg: Config) -> list[Finding]:
    per_gen: dict[tuple[str, int], list[dict]] = {}
    for r in m.layers:
        per_gen.setdefault((r["run_id"], r["gen_id"]), []).append(r)
    findings = []
    for (run_id, gen_id), rows in per_gen.items():
        sized = [r for r in rows if r["kv_bytes"]]
        if sized and len(sized) == len(rows):
            total = float(sum(r["kv_bytes"] for r in sized))
            freeable = sum(r["fraction"] * r["kv_bytes"] for r in sized)
            fraction = freeable / total
        else:
            total, freeable = None, None
            fraction = sum(r["fraction"] for r in rows) / len(rows)
        if fraction < cfg.min_fraction:
            continue
        best = max(rows, key=lambda r: r["fraction"])
        size = f" ({human_bytes(freeable)} of {human_bytes(total)} at the last step)" if total else ""
        findings.append(Finding(
            NAME, "info", run_id, gen_id, None, "evictable_fraction", fraction, cfg.min_fraction,
            f"{fraction:.0%} of the cached tokens{size} get almost no attention at every sampled step "
            f"(layer {best['layer']} most: {best['fraction']:.0%}): an eviction policy such as H2O, SnapKV or a "
            "sliding window on those layers could free that memory.",
            {"layers": [r["layer"] for r in rows], "layer_fraction": [r["fraction"] for r in rows],
             "layer_kv_bytes": [r["kv_bytes"] for r in rows], "samples": [r["samples"] for r in rows],
             "freeable_bytes": freeable, "kv_bytes": total},
        ))
    return findings


DETECTOR = Detector(NAME, Config, summary="fraction of cached tokens whose attention mass stays low (head_stats)",
                    measure=measure, judge=judge)
