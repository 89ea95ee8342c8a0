"""preallocation_waste: preallocated cache capacity far above the tokens actually stored.

Static and static-sliding caches allocate `capacity_tokens` per layer up front. At each layer's
last step, per generation: capacity / stored tokens over all preallocated layers, and the bytes
that hold no token (kv_bytes × (1 − stored / capacity)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import layer_summary

NAME = "preallocation_waste"
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    # Capacity / stored tokens above which the preallocation is wasteful: more than half of
    # every preallocated layer never held a token.
    max_ratio: float = 2.0
    # Wasted bytes below this are not worth a finding, whatever the ratio.
    min_waste_bytes: int = 1 * MIB


@dataclass(frozen=True)
class Measured:
    """Per (run, generation) with preallocated layers, ordered: layers, capacity and stored tokens
    summed over them, their ratio, the bytes that hold no token, and the largest capacity."""

    generations: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    summary = layer_summary(t)
    return Measured(t.records(f"""
        SELECT run_id, gen_id, count(*) AS layers, sum(capacity_tokens) AS capacity, sum(stored_tokens) AS stored,
          CAST(sum(capacity_tokens) AS DOUBLE) / greatest(sum(stored_tokens), 1) AS ratio,
          sum(kv_bytes * (1 - CAST(least(stored_tokens, capacity_tokens) AS DOUBLE) / capacity_tokens)) AS wasted,
          sum(kv_bytes) AS kv_bytes, max(capacity_tokens) AS max_capacity, max(stored_tokens) AS max_stored
        FROM {summary} WHERE capacity_tokens > 0
        GROUP BY run_id, gen_id ORDER BY run_id, gen_id
    """))


def judge(m: Measured, cfg: Config) -> list[Finding]:
    rows = [r for r in m.generations if r["ratio"] > cfg.max_ratio and r["wasted"] >= cfg.min_waste_bytes]
    return [Finding(
        NAME, "warning", r["run_id"], r["gen_id"], None, "capacity_ratio", r["ratio"], cfg.max_ratio,
        f"{r['layers']} preallocated layers hold capacity for {r['ratio']:.1f}x the tokens they store "
        f"(up to {r['max_capacity']} for {r['max_stored']}), wasting {human_bytes(r['wasted'])} of "
        f"{human_bytes(r['kv_bytes'])}; set max_cache_len to prompt + max_new_tokens or use a dynamic cache.",
        {"layers": r["layers"], "capacity_tokens": r["capacity"], "stored_tokens": r["stored"],
         "wasted_bytes": r["wasted"], "kv_bytes": r["kv_bytes"]},
    ) for r in rows]


DETECTOR = Detector(NAME, Config, summary="preallocated capacity far above the tokens stored",
                    measure=measure, judge=judge)
