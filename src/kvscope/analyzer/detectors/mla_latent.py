"""mla_latent: for MLA models, the compression the cache achieves and how much of the latent is used.

Expected compression per token and layer (from run.model_config):
(H·(qk_nope + qk_rope) + H·v_head_dim) / (kv_lora_rank + qk_rope). Achieved: the per-head cache's
bytes per token over the measured bytes per token (layers: kv_bytes / (batch · tokens) at the last
step, median over layers; tokens are the capacity of a preallocated layer, whose bytes cover it,
else the stored tokens: a static cache sized 8x its use is not an 8x weaker compression). A cache
that stores decompressed per-head K/V (older transformers) achieves about 1x: warning. With
head_stats `latent_effective_rank` (from `kvscope kernels`), a latent whose Roy–Vetterli effective
rank is a small part of its width is reported (info): a smaller kv_lora_rank or low-rank
compression of the latent could shrink it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding
from kvscope.analyzer.geometry import config_int, dtype_bytes, parse_config
from kvscope.analyzer.registry import Detector
from kvscope.kernels.mla import MLA_KEYS, is_mla_config, mla_compression_ratio

NAME = "mla_latent"


@dataclass(frozen=True)
class Config:
    # Achieved compression under this fraction of the expected: the latent is not what is cached.
    min_achieved_fraction: float = 0.5
    # Effective rank over latent width below this: most latent dimensions carry little.
    max_rank_fraction: float = 0.5


_BYTES = """
    SELECT run_id, layer, arg_max(kv_bytes, step) AS kv_bytes,
      arg_max(coalesce(capacity_tokens, stored_tokens), step) AS tokens,
      arg_max(k_shape[1], step) AS batch, arg_max(k_dtype, step) AS k_dtype
    FROM layers GROUP BY run_id, layer ORDER BY run_id, layer
"""

_RANK = """
    SELECT run_id, layer, median(value) FILTER (WHERE stat = 'latent_effective_rank') AS erank,
      max(value) FILTER (WHERE stat = 'latent_width') AS width, count(*) AS n
    FROM head_stats WHERE stat IN ('latent_effective_rank', 'latent_width')
    GROUP BY run_id, layer ORDER BY run_id, layer
"""


def _per_head_elements(config: dict) -> int:
    heads = int(config["num_attention_heads"])
    return heads * (int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"]) + int(config["v_head_dim"]))


@dataclass(frozen=True)
class Measured:
    """The MLA runs' configs (parsed), per (run, layer) bytes and tokens at the last step, and the
    latent's effective rank per layer (empty without head_stats); all empty for non-MLA traces."""

    configs: dict[str, dict[str, Any]]
    layers: list[dict[str, Any]]
    ranks: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    configs = {}
    for r in t.records("SELECT run_id, model_config FROM run ORDER BY run_id"):
        config = parse_config(r["model_config"])
        if is_mla_config(config):
            sizes = {key: config_int(config, key) for key in MLA_KEYS}
            if all(sizes.values()):  # untrusted: every size a sane whole number, or the run is left out
                configs[r["run_id"]] = {**config, **sizes}
    if not configs:
        return Measured({}, [], [])
    return Measured(configs, t.records(_BYTES), t.records(_RANK) if t.num_rows("head_stats") else [])


def judge(m: Measured, cfg: Config) -> list[Finding]:
    configs = m.configs
    findings = []
    layer_bytes: dict[str, list[float]] = {}
    for r in m.layers:
        run_id, kv_bytes, tokens, batch, k_dtype = r["run_id"], r["kv_bytes"], r["tokens"], r["batch"], r["k_dtype"]
        if run_id in configs and kv_bytes and tokens:
            size = dtype_bytes(configs[run_id].get("torch_dtype") or configs[run_id].get("dtype")) or dtype_bytes(k_dtype)
            if size:
                per_head = _per_head_elements(configs[run_id]) * size
                layer_bytes.setdefault(run_id, []).append(per_head / (kv_bytes / ((batch or 1) * tokens)))
    for run_id, config in configs.items():
        expected = mla_compression_ratio(config)
        if run_id not in layer_bytes:
            continue
        achieved = median(layer_bytes[run_id])
        low = achieved < cfg.min_achieved_fraction * expected
        findings.append(Finding(
            NAME, "warning" if low else "info", run_id, None, None, "mla_compression", achieved,
            cfg.min_achieved_fraction * expected,
            (f"the cache holds {achieved:.1f}x less than a per-head K/V cache where MLA's latent would give "
             f"{expected:.1f}x: it stores decompressed keys and values; use a transformers release that caches "
             "the latent (5.x)." if low else
             f"the MLA latent cache is {achieved:.1f}x smaller than a per-head K/V cache (expected {expected:.1f}x)."),
            {"expected": expected, "achieved_per_layer": layer_bytes[run_id],
             "kv_lora_rank": config["kv_lora_rank"], "qk_rope_head_dim": config["qk_rope_head_dim"]},
        ))
    for r in m.ranks:
        if r["run_id"] not in configs or not r["erank"] or not r["width"]:
            continue
        fraction = r["erank"] / r["width"]
        if fraction < cfg.max_rank_fraction:
            findings.append(Finding(
                NAME, "info", r["run_id"], None, r["layer"], "latent_rank_fraction", fraction, cfg.max_rank_fraction,
                f"the latent of layer {r['layer']} has an effective rank of {r['erank']:.1f} of its {r['width']:.0f} "
                "dimensions: a smaller kv_lora_rank or a low-rank projection of the cached latent could shrink it.",
                {"effective_rank": r["erank"], "width": r["width"], "samples": r["n"]},
            ))
    return findings


DETECTOR = Detector(NAME, Config, summary="MLA compression achieved and effective rank of the latent",
                    measure=measure, judge=judge)
