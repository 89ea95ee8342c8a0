"""device_memory: a model split over devices runs out on one device first, not on their sum.

Reads `device_steps` (a model split with device_map: per step and device, the KV bytes of the
layers whose cache lives there and that device's allocator and NVML readings; step -1 the
baseline before generate, -2 the reading after the cache was released) and, for the ranks of a
tensor-parallel job (`run.job_id`, one run per rank), each rank's `steps` on its own device.
Per job (or split run) and generation, each device's forecast is its own: the tokens of context at
which its free memory (its memory cap, else its NVML total, minus its peak use) is used up by its
own cache growth. The finding names the device that runs out first. An unbalanced split (one
device holding far more than its share of the cache), memory a device keeps after the cache was
released, and fragmentation of one device's pool are findings naming that device.
Runs on one device outside a job are `oom_forecast`'s, `post_eos`'s and `fragmentation`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector

NAME = "device_memory"


@dataclass(frozen=True)
class Config:
    # Warn when the first device to run out would do so before this multiple of the recorded
    # context (as oom_forecast's context_factor for one device).
    context_factor: float = 2.0
    # A device holding more than this multiple of the mean device's KV bytes makes the split
    # unbalanced: it runs out first while the others keep free memory (1.5: 3 layers of 4 on one
    # of two devices).
    max_kv_imbalance: float = 1.5
    # Bytes a device may keep allocated after the cache was released before it is a leak, and the
    # share of that device's growth during the generation it must also exceed.
    retention_floor_bytes: int = 64 << 20
    retention_fraction: float = 0.1
    # Mean unused share of a device's reserved memory, and mean unused bytes, both above which its
    # pool is called fragmented (fragmentation's thresholds for one device).
    max_fragmentation: float = 0.15
    fragmentation_floor_bytes: int = 256 << 20


_QUERY = """
    WITH r AS (
      SELECT run_id, any_value(job_id) AS job_id, any_value(rank) AS rank, any_value(device) AS run_device,
             any_value(num_layers) AS num_layers, any_value(memory_limit_bytes) AS cap,
             any_value(nvml_total_bytes) AS run_total
      FROM run GROUP BY run_id
    ), split AS (
      SELECT DISTINCT run_id FROM device_steps
    ), lk AS (  -- each device's layers' unique bytes per step, where device_steps leaves kv_bytes to the reader
      SELECT l.run_id, l.gen_id, l.step, d.device, sum(l.kv_bytes) AS kv_bytes, count(*) AS layers
      FROM layers l JOIN layer_devices d ON d.run_id = l.run_id AND d.gen_id = l.gen_id AND d.layer = l.layer
      GROUP BY l.run_id, l.gen_id, l.step, d.device
    ), u AS (
      SELECT ds.run_id, ds.gen_id, ds.step, ds.device, coalesce(ds.kv_bytes, lk.kv_bytes, 0) AS kv_bytes,
             coalesce(ds.layers, lk.layers, ld.layers) AS layers, ds.allocated_bytes, ds.reserved_bytes,
             ds.nvml_used_bytes, coalesce(ds.memory_limit_bytes, ds.nvml_total_bytes) AS total, s.seq_len
      FROM device_steps ds
      LEFT JOIN steps s ON s.run_id = ds.run_id AND s.gen_id = ds.gen_id AND s.step = ds.step
      LEFT JOIN lk ON lk.run_id = ds.run_id AND lk.gen_id = ds.gen_id AND lk.step = ds.step AND lk.device = ds.device
      LEFT JOIN (SELECT run_id, gen_id, device, count(*) AS layers FROM layer_devices GROUP BY run_id, gen_id, device) ld
        ON ld.run_id = ds.run_id AND ld.gen_id = ds.gen_id AND ld.device = ds.device
      UNION ALL
      SELECT s.run_id, s.gen_id, s.step, r.run_device AS device, s.kv_bytes, r.num_layers AS layers,
             s.allocated_bytes, s.reserved_bytes, s.nvml_used_bytes,
             coalesce(r.cap, s.nvml_total_bytes, r.run_total) AS total, s.seq_len
      FROM steps s JOIN r ON r.run_id = s.run_id
      WHERE r.job_id IS NOT NULL AND s.run_id NOT IN (SELECT run_id FROM split)
    )
    SELECT u.run_id, u.gen_id, u.device, any_value(r.job_id) AS job_id, any_value(r.rank) AS rank,
      max(CASE WHEN u.step >= 0 THEN u.seq_len END) AS context,
      covar_pop(CASE WHEN u.step >= 0 THEN CAST(u.seq_len AS DOUBLE) END,
                CASE WHEN u.step >= 0 THEN CAST(u.kv_bytes AS DOUBLE) END)
        / nullif(var_pop(CASE WHEN u.step >= 0 THEN CAST(u.seq_len AS DOUBLE) END), 0) AS rate,
      max(CASE WHEN u.step >= 0 THEN u.kv_bytes END) AS kv_bytes,
      max(u.layers) AS layers,
      max(u.total) AS total,
      max(CASE WHEN u.step >= 0 THEN coalesce(u.nvml_used_bytes, u.reserved_bytes, u.allocated_bytes) END) AS peak_used,
      avg(CASE WHEN u.step >= 0 AND u.reserved_bytes > 0
               THEN CAST(u.reserved_bytes - u.allocated_bytes AS DOUBLE) / u.reserved_bytes END) AS fragmentation,
      avg(CASE WHEN u.step >= 0 THEN CAST(u.reserved_bytes - u.allocated_bytes AS DOUBLE) END) AS unused,
      max(CASE WHEN u.step = -1 THEN u.allocated_bytes END) AS baseline_allocated,
      max(CASE WHEN u.step = -2 THEN u.allocated_bytes END) AS released_allocated,
      max(CASE WHEN u.step >= 0 THEN u.allocated_bytes END) AS peak_allocated
    FROM u JOIN r ON r.run_id = u.run_id
    GROUP BY u.run_id, u.gen_id, u.device
    ORDER BY u.run_id, u.gen_id, u.device
"""


@dataclass(frozen=True)
class Measured:
    """Per (run, generation, device), ordered: context, the device's cache growth per token, its
    cache and layers, total (cap) and peak use, pool fragmentation, allocated bytes at the
    baseline, after release and at the peak; with the job and rank of its run."""

    devices: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    if not t.num_rows("device_steps") and not t.records("SELECT 1 AS x FROM run WHERE job_id IS NOT NULL LIMIT 1"):
        return Measured([])
    return Measured(t.records(_QUERY))


def _name(r: dict[str, Any]) -> str:
    return r["device"] if r["rank"] is None else f"rank {r['rank']} ({r['device']})"


def _tokens_to_oom(r: dict[str, Any]) -> float | None:
    if not r["total"] or r["peak_used"] is None or not r["rate"] or r["rate"] <= 0 or r["context"] is None:
        return None
    return r["context"] + max(r["total"] - r["peak_used"], 0) / r["rate"]


def _forecast(rows: list[dict[str, Any]], cfg: Config) -> list[Finding]:
    timed = sorted(((t, r) for r in rows if (t := _tokens_to_oom(r)) is not None), key=lambda x: x[0])
    if not timed:
        return []
    tokens, first = timed[0]
    context = max(r["context"] or 0 for r in rows)
    limit = cfg.context_factor * context
    share = (first["kv_bytes"] or 0) / max(sum(r["kv_bytes"] or 0 for r in rows), 1)
    rest = "; ".join(f"{_name(r)} at {t:,.0f}" for t, r in timed[1:4])
    severity = "warning" if tokens < limit else "info"
    advice = ("move layers off it (device_map / max_memory) or shorten the context" if severity == "warning"
              else "no action needed")
    message = (f"{_name(first)} runs out first, at about {tokens:,.0f} tokens of context: "
               f"{human_bytes(max(first['total'] - first['peak_used'], 0))} free of {human_bytes(first['total'])}, "
               f"{human_bytes(first['rate'])} more per token; it holds {share:.0%} of the cache "
               f"({first['layers']} layer{'s' if first['layers'] != 1 else ''})"
               f"{f'; then {rest}' if rest else ''}; {advice}")
    evidence = {"device": first["device"], "rank": first["rank"], "job_id": first["job_id"],
                "devices": [{"device": r["device"], "rank": r["rank"], "run_id": r["run_id"], "tokens_to_oom": t,
                             "kv_bytes": r["kv_bytes"], "layers": r["layers"], "total_bytes": r["total"],
                             "peak_used_bytes": r["peak_used"], "bytes_per_token": r["rate"]} for t, r in timed]}
    return [Finding(NAME, severity, first["run_id"], first["gen_id"], None, "first_device_tokens_to_oom", tokens,
                    limit, message, evidence)]


def _imbalance(rows: list[dict[str, Any]], cfg: Config) -> list[Finding]:
    sizes = [r["kv_bytes"] or 0 for r in rows]
    mean = sum(sizes) / len(sizes)
    if mean <= 0:
        return []
    big = max(rows, key=lambda r: r["kv_bytes"] or 0)
    ratio = (big["kv_bytes"] or 0) / mean
    if ratio < cfg.max_kv_imbalance:
        return []
    share = (big["kv_bytes"] or 0) / sum(sizes)
    layers = sum(r["layers"] or 0 for r in rows)
    return [Finding(NAME, "warning", big["run_id"], big["gen_id"], None, "kv_share_over_mean", ratio,
                    cfg.max_kv_imbalance,
                    f"unbalanced split: {_name(big)} holds {share:.0%} of the KV cache ({human_bytes(big['kv_bytes'])}, "
                    f"{big['layers']} of {layers} layers) across {len(rows)} devices, {ratio:.2f}x the mean device: "
                    "it runs out while the others keep memory free; balance the layers (device_map / max_memory)",
                    {"device": big["device"], "rank": big["rank"], "kv_bytes": {r["device"]: r["kv_bytes"] for r in rows},
                     "layers": {r["device"]: r["layers"] for r in rows}})]


def _retention(r: dict[str, Any], cfg: Config) -> list[Finding]:
    base, kept, peak = r["baseline_allocated"], r["released_allocated"], r["peak_allocated"]
    if base is None or kept is None or peak is None:
        return []
    held, growth = kept - base, max(peak - base, 0)
    if held <= cfg.retention_floor_bytes or held <= cfg.retention_fraction * growth:
        return []
    fraction = held / growth if growth else 1.0
    return [Finding(NAME, "warning", r["run_id"], r["gen_id"], None, "device_retained_bytes", float(held),
                    float(cfg.retention_floor_bytes),
                    f"{_name(r)} keeps {human_bytes(held)} allocated after the generation's cache was released "
                    f"({fraction:.0%} of what it grew by): a reference to its tensors outlives generate",
                    {"device": r["device"], "rank": r["rank"], "baseline_bytes": base, "released_bytes": kept,
                     "peak_bytes": peak})]


def _fragmentation(r: dict[str, Any], cfg: Config) -> list[Finding]:
    frag, unused = r["fragmentation"], r["unused"]
    if frag is None or unused is None or frag < cfg.max_fragmentation or unused < cfg.fragmentation_floor_bytes:
        return []
    return [Finding(NAME, "warning", r["run_id"], r["gen_id"], None, "device_fragmentation", frag,
                    cfg.max_fragmentation,
                    f"{_name(r)}: {frag:.0%} of its reserved memory is unused on average during the generation "
                    f"({human_bytes(unused)} unused on average)",
                    {"device": r["device"], "rank": r["rank"], "mean_unused_bytes": unused})]


def judge(m: Measured, cfg: Config) -> list[Finding]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in m.devices:
        groups.setdefault((r["job_id"] or r["run_id"], r["gen_id"]), []).append(r)
    findings: list[Finding] = []
    for rows in groups.values():
        if len(rows) > 1:
            findings += _forecast(rows, cfg) + _imbalance(rows, cfg)
        for r in rows:
            findings += _retention(r, cfg) + _fragmentation(r, cfg)
    return findings


DETECTOR = Detector(NAME, Config, summary="per device: the first to run out, unbalanced splits, retention and "
                    "fragmentation of one device", measure=measure, judge=judge)
