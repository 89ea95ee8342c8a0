"""The numbers of a run that its verdict quotes and no finding carries.

A healthy cache yields no growth finding and low fragmentation none, yet the verdict says how many
bytes a token costs, how fragmented the pool was and what was retained: `run_facts(tables)` reads
those with a few small queries per set of traces (both engines). `kvscope.analyzer.verdict` judges
them with the findings; `export` and `fleet` reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.summaries import decode_step_fits, layer_summary, step_fits, step_ranges


@dataclass(frozen=True)
class LayerTypeFacts:
    """The layers of one type at their generation's last step (the largest context)."""

    layer_type: str
    layers: int
    bytes_per_token: float | None  # median over the layers, per sequence
    max_stored_tokens: int | None
    max_kv_bytes: int | None


@dataclass(frozen=True)
class GenerationMemory:
    """Bytes above the generation's baseline after it ended and empty_cache() ran, per cause."""

    gen_id: int
    live_bytes: int | None
    pool_bytes: int | None
    outside_bytes: int | None


@dataclass(frozen=True)
class RunFacts:
    """The numbers of one run that a verdict quotes."""

    run_id: str
    model_name: str
    trace: str | None = None
    device: str | None = None
    gpu_name: str | None = None
    num_layers: int | None = None
    generations: int = 0
    steps: int = 0
    max_context: int | None = None
    batch_size: int | None = None
    peak_kv_bytes: int | None = None
    bytes_per_token: float | None = None  # median slope of steps.kv_bytes on seq_len (decode steps), per sequence
    flat_generations: int = 0  # generations whose KV bytes never changed
    preallocated_generations: tuple[int, ...] = ()  # generations with a preallocated (static) layer
    layer_types: tuple[LayerTypeFacts, ...] = ()
    mean_fragmentation: float | None = None
    max_unused_bytes: int | None = None  # reserved − allocated, at most
    max_inactive_split_bytes: int | None = None
    alloc_retries: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_nvml_bytes: int | None = None
    total_bytes: int | None = None
    non_kv_allocated_bytes: int | None = None  # allocated − KV at the allocated peak
    unused_reserved_bytes: int | None = None  # reserved − allocated at the allocated peak
    outside_torch_bytes: int | None = None  # NVML used − reserved at the allocated peak
    oom_events: int = 0
    retention: tuple[GenerationMemory, ...] = ()

    @property
    def has_gpu_readings(self) -> bool:
        return self.peak_allocated_bytes is not None


def run_facts(t: Engine) -> list[RunFacts]:
    """The numbers of every run in the loaded traces that a verdict quotes (a few small queries)."""
    runs = {r["run_id"]: r for r in t.records("""
        SELECT run_id, any_value(model_name) AS model_name, any_value(device) AS device,
               any_value(gpu_name) AS gpu_name, any_value(num_layers) AS num_layers,
               any_value(nvml_total_bytes) AS run_total
        FROM run GROUP BY run_id""")}
    steps = {r["run_id"]: r for r in t.records("""
        SELECT run_id, count(DISTINCT gen_id) AS generations, count(*) AS steps, max(seq_len) AS max_context,
          max(batch_size) AS batch_size, max(kv_bytes) AS peak_kv,
          avg(CASE WHEN reserved_bytes > 0 THEN CAST(reserved_bytes - allocated_bytes AS DOUBLE) / reserved_bytes END)
            AS mean_frag,
          max(reserved_bytes - allocated_bytes) AS max_unused, max(inactive_split_bytes) AS max_split,
          max(alloc_retries) - min(alloc_retries) AS retries,
          max(allocated_bytes) AS peak_alloc, max(reserved_bytes) AS peak_reserved,
          max(nvml_used_bytes) AS peak_nvml, max(nvml_total_bytes) AS total
        FROM steps GROUP BY run_id""")}
    # the step of the allocated peak (the latest one on a tie), and what lies beside the cache there
    for r in t.records("""
        SELECT run_id, allocated_bytes - kv_bytes AS non_kv, reserved_bytes - allocated_bytes AS unused_at_peak,
               nvml_used_bytes - reserved_bytes AS outside_torch
        FROM steps WHERE allocated_bytes IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY allocated_bytes DESC, t_ns DESC, gen_id DESC) = 1"""):
        steps.setdefault(r["run_id"], {}).update(non_kv=r["non_kv"], unused_at_peak=r["unused_at_peak"],
                                                 outside_torch=r["outside_torch"])
    # The growth rate per sequence (a batch of 3 grows 3x per step) over decode steps (a sliding
    # layer's prefill view holds the whole prompt at step 0: short generations after long prompts
    # would read as shrinking caches); generations without decode steps fall back to all steps.
    fits = {r["run_id"]: r for r in t.records(f"""
        SELECT a.run_id,
               coalesce(median(d.slope / b.batch_size) FILTER (WHERE d.vyy > 0),
                        median(a.slope / b.batch_size) FILTER (WHERE a.vyy > 0)) AS slope,
               count(*) FILTER (WHERE coalesce(d.vyy, a.vyy, 0) = 0) AS flat
        FROM {step_fits(t)} a LEFT JOIN {decode_step_fits(t)} d USING (run_id, gen_id)
          JOIN {step_ranges(t)} b USING (run_id, gen_id)
        GROUP BY a.run_id""")}
    summary = layer_summary(t)
    types: dict[str, list[LayerTypeFacts]] = {}
    for r in t.records(f"""
        SELECT run_id, layer_type, count(DISTINCT layer) AS layers,
          median(CAST(kv_bytes AS DOUBLE) / (greatest(batch_size, 1) * nullif(coalesce(capacity_tokens, stored_tokens), 0)))
            AS bpt,
          max(stored_tokens) AS max_stored, max(kv_bytes) AS max_kv
        FROM {summary} GROUP BY run_id, layer_type ORDER BY run_id, layer_type"""):
        types.setdefault(r["run_id"], []).append(LayerTypeFacts(
            str(r["layer_type"]), int(r["layers"]), r["bpt"], r["max_stored"], r["max_kv"]))
    prealloc_gens: dict[str, tuple[int, ...]] = {r["run_id"]: tuple(sorted(r["gens"])) for r in t.records(f"""
        SELECT run_id, list(DISTINCT gen_id) AS gens FROM {summary} WHERE capacity_tokens IS NOT NULL GROUP BY run_id""")}
    retention: dict[str, list[GenerationMemory]] = {}
    for r in t.records("""
        SELECT run_id, gen_id,
          post_empty_cache_allocated_bytes - baseline_allocated_bytes AS live,
          (post_empty_cache_reserved_bytes - post_empty_cache_allocated_bytes)
            - (baseline_reserved_bytes - baseline_allocated_bytes) AS pools,
          (post_empty_cache_nvml_used_bytes - post_empty_cache_reserved_bytes)
            - (baseline_nvml_used_bytes - baseline_reserved_bytes) AS outside
        FROM generations ORDER BY run_id, gen_id"""):
        retention.setdefault(r["run_id"], []).append(GenerationMemory(int(r["gen_id"]), r["live"], r["pools"],
                                                                      r["outside"]))
    ooms = {r["run_id"]: int(r["n"]) for r in t.records(
        "SELECT run_id, count(*) AS n FROM events WHERE kind = 'oom' GROUP BY run_id")}
    traces = t.run_traces()
    out = []
    for run_id in sorted(set(runs) | set(steps)):
        run, st, fit = runs.get(run_id, {}), steps.get(run_id, {}), fits.get(run_id, {})

        def num(row: dict[str, Any], key: str) -> Any:
            v = row.get(key)
            return None if v is None else (int(v) if isinstance(v, int) else float(v))

        out.append(RunFacts(
            run_id=run_id, model_name=str(run.get("model_name") or "?"), trace=traces.get(run_id),
            device=run.get("device"), gpu_name=run.get("gpu_name"), num_layers=run.get("num_layers"),
            generations=int(st.get("generations") or 0), steps=int(st.get("steps") or 0),
            max_context=num(st, "max_context"), batch_size=num(st, "batch_size"), peak_kv_bytes=num(st, "peak_kv"),
            bytes_per_token=num(fit, "slope"), flat_generations=int(fit.get("flat") or 0),
            preallocated_generations=prealloc_gens.get(run_id, ()),
            layer_types=tuple(types.get(run_id, [])), mean_fragmentation=num(st, "mean_frag"),
            max_unused_bytes=num(st, "max_unused"), max_inactive_split_bytes=num(st, "max_split"),
            alloc_retries=num(st, "retries"), peak_allocated_bytes=num(st, "peak_alloc"),
            peak_reserved_bytes=num(st, "peak_reserved"), peak_nvml_bytes=num(st, "peak_nvml"),
            total_bytes=num(st, "total") if st.get("total") is not None else run.get("run_total"),
            non_kv_allocated_bytes=num(st, "non_kv"), unused_reserved_bytes=num(st, "unused_at_peak"),
            outside_torch_bytes=num(st, "outside_torch"), oom_events=ooms.get(run_id, 0),
            retention=tuple(retention.get(run_id, [])),
        ))
    return out
