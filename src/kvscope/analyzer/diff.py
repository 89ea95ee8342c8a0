"""What changed between two traces: per-layer bytes per token, peaks, retention, fragmentation,
and the findings present in one and not the other (e.g. bf16 vs int8, two transformers releases)."""

from __future__ import annotations

from typing import Any

from kvscope.analyzer.analyze import analyze
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.summaries import generation_scores, layer_summary

_FINDING_KEY = ("detector", "severity", "metric", "layer")


def profile(t: LoadedTraces, min_severity: str = "warning") -> dict[str, Any]:
    """The numbers `diff` compares, for one set of traces."""
    summary = layer_summary(t)
    per_layer = {int(layer): {"layer_type": kind, "bytes_per_token": bpt} for layer, kind, bpt in t.rows(f"""
        SELECT layer, any_value(layer_type), median(kv_bytes::DOUBLE / batch_size / stored_tokens)
        FROM {summary} WHERE stored_tokens > 0 GROUP BY layer ORDER BY layer
    """)}
    peak_kv, peak_alloc, peak_reserved, mean_f = t.rows("""
        SELECT max(kv_bytes), max(allocated_bytes), max(reserved_bytes),
               avg(CASE WHEN reserved_bytes > 0 THEN (reserved_bytes - allocated_bytes)::DOUBLE / reserved_bytes END)
        FROM steps
    """)[0]
    retention = t.rows(f"SELECT avg(live), max(live), avg(outside) FROM {generation_scores(t)}")[0]
    runs = [r[0] for r in t.rows("SELECT run_id FROM run ORDER BY run_id")]
    findings = [f for f in analyze(t) if f.at_least(min_severity)]
    return {
        "runs": runs,
        "layers": per_layer,
        "peak_kv_bytes": peak_kv,
        "peak_allocated_bytes": peak_alloc,
        "peak_reserved_bytes": peak_reserved,
        "mean_fragmentation": mean_f,
        "mean_live_retention": retention[0],
        "max_live_retention": retention[1],
        "mean_outside_retention": retention[2],
        "findings": [f.to_dict() for f in findings],
    }


def _change(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return (b - a) / a


def compare(a: LoadedTraces, b: LoadedTraces, min_severity: str = "warning") -> dict[str, Any]:
    """The differences between trace set `a` (before) and `b` (after)."""
    pa_, pb = profile(a, min_severity), profile(b, min_severity)
    layers = []
    for layer in sorted(set(pa_["layers"]) | set(pb["layers"])):
        la, lb = pa_["layers"].get(layer, {}), pb["layers"].get(layer, {})
        bpt_a, bpt_b = la.get("bytes_per_token"), lb.get("bytes_per_token")
        types = list(dict.fromkeys(t for t in (la.get("layer_type"), lb.get("layer_type")) if t))
        layers.append({"layer": layer, "layer_type": "/".join(types) or None,
                       "a": bpt_a, "b": bpt_b, "change": _change(bpt_a, bpt_b)})
    metrics = []
    for name in ("peak_kv_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "mean_fragmentation",
                 "mean_live_retention", "max_live_retention", "mean_outside_retention"):
        metrics.append({"metric": name, "a": pa_[name], "b": pb[name], "change": _change(pa_[name], pb[name])})

    def keys(findings: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {tuple(f[k] for k in _FINDING_KEY): f for f in findings}

    ka, kb = keys(pa_["findings"]), keys(pb["findings"])
    return {
        "a": {"runs": pa_["runs"]},
        "b": {"runs": pb["runs"]},
        "layers": layers,
        "metrics": metrics,
        "only_in_a": [ka[k] for k in sorted(set(ka) - set(kb), key=str)],
        "only_in_b": [kb[k] for k in sorted(set(kb) - set(ka), key=str)],
    }
