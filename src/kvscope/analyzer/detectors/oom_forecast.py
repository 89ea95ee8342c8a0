"""oom_forecast: at how many tokens, or what batch size, this run would run out of device memory.

Per generation: the cache's marginal growth (bytes per token of context over the last quarter of
the generation, from the step totals, never less than the overall slope) extrapolated from the
peak device memory in use (NVML, else reserved, else allocated) to the device's total memory
(steps.nvml_total_bytes, else run.nvml_total_bytes). The batch forecast scales the KV bytes per
sequence at the recorded context and keeps everything else (weights, workspaces) fixed.
When the run was capped (run.memory_limit_bytes: set_per_process_memory_fraction, a MIG slice, an
MPS limit), the cap is the total and the caching allocator's reserved bytes are what it counts.
A model split over several devices (`device_steps`) is left to device_memory, which forecasts
each device on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.summaries import step_fits
from kvscope.analyzer.untrusted import count, json_object, number, obj, text

NAME = "oom_forecast"


@dataclass(frozen=True)
class Config:
    # Warn when the device would run out before this multiple of the recorded context: a run
    # that cannot double its context is one longer prompt away from an OOM.
    context_factor: float = 2.0
    # Warn when fewer than this many sequences of the recorded context would fit at once.
    min_batch: int = 1


def limit_name(options: str | None, limit: float) -> str:
    """What capped the run, from run.options' memory_limit (written by the recorder)."""
    info = obj(json_object(options).get("memory_limit"))
    sources = info.get("sources")
    source = obj(sources[0]) if isinstance(sources, list) and sources else {}
    kind = source.get("kind")
    fraction = number(source.get("fraction"))
    if kind == "per_process_memory_fraction" and fraction is not None:
        return (f"the {human_bytes(limit)} allowed by torch.cuda.set_per_process_memory_fraction"
                f"({fraction:.3g}) of {human_bytes(count(source.get('device_bytes')))}")
    if kind == "mig_or_visible_memory":
        return f"the {human_bytes(limit)} of the MIG slice (the GPU has {human_bytes(count(source.get('nvml_total_bytes')))})"
    if kind == "mps_pinned_device_mem_limit" and text(source.get("value")) is not None:
        return f"the {human_bytes(limit)} of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={source.get('value')}"
    return f"the {human_bytes(limit)} memory limit"


@dataclass(frozen=True)
class Measured:
    """Per generation with a device total, ordered by run and generation: context, cache bytes at the
    last step, peak memory in use, the device's total (or cap), batch, growth rate and OOMs seen."""

    generations: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    fits = step_fits(t)
    return Measured(t.records(f"""
        WITH r AS (
          SELECT run_id, any_value(nvml_total_bytes) AS nvml_total_bytes, any_value(memory_limit_bytes) AS cap,
                 any_value(options) AS options FROM run GROUP BY run_id
        ), mem AS (
          SELECT s.run_id, s.gen_id, any_value(r.cap) AS cap, any_value(r.options) AS options,
            coalesce(any_value(r.cap), max(s.nvml_total_bytes), any_value(r.nvml_total_bytes)) AS total,
            -- under a cap the allocator's reserved bytes are what it counts; else all the device uses
            CASE WHEN any_value(r.cap) IS NOT NULL AND max(s.reserved_bytes) IS NOT NULL THEN max(s.reserved_bytes)
                 ELSE max(coalesce(s.nvml_used_bytes, s.reserved_bytes, s.allocated_bytes)) END AS peak_used,
            greatest(coalesce(max(s.batch_size), 1), 1) AS batch,
            max(s.num_ooms) - min(s.num_ooms) AS new_ooms
          FROM steps s LEFT JOIN r USING (run_id)
          -- a model split over devices runs out on one of them: device_memory forecasts it
          WHERE s.run_id NOT IN (SELECT DISTINCT run_id FROM device_steps)
          GROUP BY s.run_id, s.gen_id
        ), ev AS (
          SELECT run_id, gen_id, count(*) AS oom_events FROM events WHERE kind = 'oom' GROUP BY ALL
        )
        SELECT f.run_id, f.gen_id, f.max_seq_len AS context, f.last_kv_bytes AS kv_bytes, m.total, m.peak_used,
          m.batch, m.cap, m.options, greatest(coalesce(f.slope_last, f.slope, 0), coalesce(f.slope, 0)) AS rate,
          coalesce(m.new_ooms, 0) + coalesce(ev.oom_events, 0) AS ooms
        FROM {fits} f JOIN mem m USING (run_id, gen_id) LEFT JOIN ev USING (run_id, gen_id)
        WHERE m.total > 0 AND m.peak_used IS NOT NULL ORDER BY f.run_id, f.gen_id
    """))


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings = []
    for r in m.generations:
        headroom = max(r["total"] - r["peak_used"], 0)  # NVML never reads above the total
        per_seq = r["kv_bytes"] / r["batch"] if r["kv_bytes"] else 0.0
        tokens = r["context"] + headroom / r["rate"] if r["rate"] > 0 else None
        max_batch = max(int((r["total"] - (r["peak_used"] - r["kv_bytes"])) // per_seq), 0) if per_seq > 0 else None
        evidence = {"total_bytes": r["total"], "peak_used_bytes": r["peak_used"], "headroom_bytes": headroom,
                    "bytes_per_token": r["rate"], "context_tokens": r["context"], "batch_size": r["batch"],
                    "kv_bytes_per_sequence": per_seq, "max_batch_size": max_batch, "tokens_to_oom": tokens,
                    "ooms": r["ooms"], "memory_limit_bytes": r["cap"]}
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
        of = limit_name(r["options"], r["total"]) if r["cap"] is not None else human_bytes(r["total"])
        findings.append(Finding(
            NAME, severity, r["run_id"], r["gen_id"], None, metric, value, threshold,
            f"with {human_bytes(headroom)} free of {of} and {human_bytes(r['rate'])} more per "
            f"token, this run {at}{batch_text}; {advice}",
            evidence,
        ))
    return findings


DETECTOR = Detector(NAME, Config, summary="tokens and batch size at which the device would run out of memory",
                    measure=measure, judge=judge)
