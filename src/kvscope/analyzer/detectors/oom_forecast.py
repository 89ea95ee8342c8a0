"""oom_forecast: at how many tokens, or what batch size, this run would run out of device memory.

Per generation: the cache's marginal growth (bytes per token of context over the last quarter of
the generation, from the step totals, never less than the overall slope) extrapolated from the
peak device memory in use (NVML, else reserved, else allocated) to the device's total memory
(steps.nvml_total_bytes, else run.nvml_total_bytes). The batch forecast scales the KV bytes per
sequence at the recorded context and keeps everything else (weights, workspaces) fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import step_fits

NAME = "oom_forecast"


@dataclass(frozen=True)
class Config:
    # Warn when the device would run out before this multiple of the recorded context: a run
    # that cannot double its context is one longer prompt away from an OOM.
    context_factor: float = 2.0
    # Warn when fewer than this many sequences of the recorded context would fit at once.
    min_batch: int = 1


def detect(t: LoadedTraces, cfg: Config) -> list[Finding]:
    fits = step_fits(t)
    rows = t.records(f"""
        WITH mem AS (
          SELECT s.run_id, s.gen_id,
            coalesce(max(s.nvml_total_bytes), any_value(r.nvml_total_bytes)) AS total,
            max(coalesce(s.nvml_used_bytes, s.reserved_bytes, s.allocated_bytes)) AS peak_used,
            greatest(coalesce(max(s.batch_size), 1), 1) AS batch,
            max(s.num_ooms) - min(s.num_ooms) AS new_ooms
          FROM steps s LEFT JOIN run r USING (run_id) GROUP BY s.run_id, s.gen_id
        ), ev AS (
          SELECT run_id, gen_id, count(*) AS oom_events FROM events WHERE kind = 'oom' GROUP BY ALL
        )
        SELECT f.run_id, f.gen_id, f.max_seq_len AS context, f.last_kv_bytes AS kv_bytes, m.total, m.peak_used,
          m.batch, greatest(coalesce(f.slope_last, f.slope, 0), coalesce(f.slope, 0)) AS rate,
          coalesce(m.new_ooms, 0) + coalesce(ev.oom_events, 0) AS ooms
        FROM {fits} f JOIN mem m USING (run_id, gen_id) LEFT JOIN ev USING (run_id, gen_id)
        WHERE m.total > 0 AND m.peak_used IS NOT NULL ORDER BY f.run_id, f.gen_id
    """)
    findings = []
    for r in rows:
        headroom = max(r["total"] - r["peak_used"], 0)  # NVML never reads above the total
        per_seq = r["kv_bytes"] / r["batch"] if r["kv_bytes"] else 0.0
        tokens = r["context"] + headroom / r["rate"] if r["rate"] > 0 else None
        max_batch = max(int((r["total"] - (r["peak_used"] - r["kv_bytes"])) // per_seq), 0) if per_seq > 0 else None
        evidence = {"total_bytes": r["total"], "peak_used_bytes": r["peak_used"], "headroom_bytes": headroom,
                    "bytes_per_token": r["rate"], "context_tokens": r["context"], "batch_size": r["batch"],
                    "kv_bytes_per_sequence": per_seq, "max_batch_size": max_batch, "tokens_to_oom": tokens,
                    "ooms": r["ooms"]}
        at = (f"would run out at about {tokens:,.0f} tokens of context" if tokens is not None
              else "would not run out from cache growth (the cache stopped growing)")
        batch_text = f" and at batch size {max_batch + 1}" if max_batch is not None else ""
        limit = cfg.context_factor * r["context"]
        if r["ooms"]:
            severity, advice = "critical", "it already ran out during this generation: lower the batch or context."
        elif (tokens is not None and tokens < limit) or (max_batch is not None and max_batch < cfg.min_batch):
            severity, advice = "warning", "shorten the context, lower the batch, or quantise the cache."
        else:
            severity, advice = "info", "no action needed."
        # a cache that stopped growing never runs out by tokens: then the batch size is the forecast
        metric, value, threshold = (("tokens_to_oom", tokens, limit) if tokens is not None
                                    else ("max_batch_size", float(max_batch or 0), float(cfg.min_batch)))
        findings.append(Finding(
            NAME, severity, r["run_id"], r["gen_id"], None, metric, value, threshold,
            f"with {human_bytes(headroom)} free of {human_bytes(r['total'])} and {human_bytes(r['rate'])} more per "
            f"token, this run {at}{batch_text}; {advice}",
            evidence,
        ))
    return findings


DETECTOR = Detector(NAME, Config, detect, "tokens and batch size at which the device would run out of memory")
