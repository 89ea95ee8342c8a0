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

import math
from dataclasses import dataclass
from functools import reduce
from statistics import fmean, median, pstdev
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, bytes_in_unit_of, layer_list
from kvscope.analyzer.geometry import config_int, parse_config
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


@dataclass(frozen=True)
class Measured:
    """The layers at each generation's last step (ordered by run, generation, layer: kv_bytes,
    stored_tokens, the generation's context, the layer's declared type) and, per run, the sliding
    window, the model's layer count and its KV-shared layers from run.model_config."""

    layers: list[dict[str, Any]]
    runs: dict[str, dict[str, Any]]


def _run_geometry(t: Engine) -> dict[str, dict[str, Any]]:
    """Per run: sliding window, declared layer_types, model layers and KV-shared layers."""
    out = {}
    for r in t.records("SELECT run_id, model_config, layer_types, num_layers FROM run ORDER BY run_id"):
        parsed = parse_config(r["model_config"])
        window = config_int(parsed, "sliding_window")
        shared = parsed.get("num_kv_shared_layers")
        shared = config_int(parsed, "num_kv_shared_layers") if isinstance(shared, int) else None
        out.setdefault(r["run_id"], {"sliding_window": window or None, "declared": list(r["layer_types"] or []),
                                     "model_layers": int(r["num_layers"]) if r["num_layers"] else None,
                                     "kv_shared": shared})
    return out


def measure(t: Engine) -> Measured:
    summary = layer_summary(t)
    runs = _run_geometry(t)
    rows = t.records(f"""
        SELECT run_id, gen_id, layer, layer_type, kv_bytes, stored_tokens, last_seq_len FROM {summary}
        WHERE layer_type NOT IN {constant_types_sql()} ORDER BY run_id, gen_id, layer
    """)
    for r in rows:
        declared = runs.get(r["run_id"], {}).get("declared") or []
        named = declared[r["layer"]] if 0 <= r["layer"] < len(declared) else None
        r["declared_type"] = named if named is not None else r["layer_type"]
    return Measured(rows, runs)


def _modes(layers: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Layers sorted by bytes, a new mode wherever one holds more than mode_gap times the previous."""
    modes: list[list[dict[str, Any]]] = []
    previous = None
    for r in sorted(layers, key=lambda r: (r["kv_bytes"], r["layer"])):
        if previous is None or r["kv_bytes"] > cfg.mode_gap * previous:
            modes.append([])
        modes[-1].append(r)
        previous = r["kv_bytes"]
    return [{"n": len(m), "bytes": float(median([r["kv_bytes"] for r in m])),
             "layers": sorted(r["layer"] for r in m), "types": sorted({r["declared_type"] for r in m})}
            for m in modes]


def _generations(m: Measured, cfg: Config) -> list[dict[str, Any]]:
    """Per (run, generation): layers, CV of their bytes, context, modes and unsaturated sliding layers."""
    by_gen: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in m.layers:
        by_gen.setdefault((r["run_id"], r["gen_id"]), []).append(r)
    out = []
    for (run_id, gen_id), layers in by_gen.items():
        run = m.runs.get(run_id, {})
        window = run.get("sliding_window")
        sizes = [r["kv_bytes"] for r in layers]
        mean = fmean(sizes)
        slack = window + cfg.window_slack_tokens if window is not None else None
        contexts = [r["last_seq_len"] for r in layers if r["last_seq_len"] is not None]
        out.append({
            "run_id": run_id, "gen_id": gen_id, "layers": len(layers),
            "cv": pstdev(sizes) / mean if mean else None, "context": max(contexts, default=None),
            "sliding_window": window, "model_layers": run.get("model_layers"), "kv_shared": run.get("kv_shared"),
            "unsaturated": sorted(r["layer"] for r in layers if slack is not None and "sliding" in r["declared_type"]
                                  and max(r["last_seq_len"] or 0, r["stored_tokens"]) > slack
                                  and r["stored_tokens"] > slack),
            "modes": _modes(layers, cfg),
        })
    return out


def judge(m: Measured, cfg: Config) -> list[Finding]:
    rows = _generations(m, cfg)
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


DETECTOR = Detector(NAME, Config, summary="per-layer KV bytes CV and modes; declared sliding layers that never saturate",
                    measure=measure, judge=judge)
