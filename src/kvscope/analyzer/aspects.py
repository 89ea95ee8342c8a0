"""The five aspects of a run's verdict: the KV cache, retention, fragmentation, memory outside
the cache and the OOM forecast, each a status, a short label and a sentence with numbers.

Pure functions of a run's `RunFacts` and its findings; `kvscope.analyzer.verdict` puts them
together with the grouped findings. Findings are read by detector name and metric only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvscope.analyzer.findings import Finding, human_bytes, span_text
from kvscope.analyzer.run_facts import RunFacts

# Status of one aspect, least to most serious: "n/a" (not measurable in this trace), "ok", "note"
# (worth knowing, no action: a warm-up, a saturated window), then the finding severities.
STATUSES = ("n/a", "ok", "note", "warning", "critical")
_STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}

ASPECTS = ("kv_cache", "retention", "fragmentation", "outside_cache", "oom")
ASPECT_TITLES = {"kv_cache": "KV cache", "retention": "retention", "fragmentation": "fragmentation",
                 "outside_cache": "outside cache", "oom": "OOM forecast"}
# Which aspect a detector's findings speak to (unknown detectors: none, they still get grouped).
_DETECTOR_ASPECT = {
    "growth_curve": "kv_cache", "cache_density": "kv_cache", "layer_anomaly": "kv_cache",
    "layer_uniformity": "kv_cache", "preallocation_waste": "kv_cache", "mla_latent": "kv_cache",
    "dead_heads": "kv_cache", "eviction_headroom": "kv_cache", "cache_seen": "kv_cache",
    "post_eos": "retention", "fragmentation": "fragmentation",
    "oom_forecast": "oom", "oom_event": "oom",
}
# Words in a metric that make it about the memory beside the cache, whichever detector reports it
# (and growth_curve's fits of the allocator's footprint outside the cache: `outside_*` metrics).
_OUTSIDE_WORDS = ("outside_cache", "non_kv", "footprint", "beside_cache")


# device_memory speaks to several aspects, one per metric (each naming a device).
_DEVICE_METRIC_ASPECT = {"first_device_tokens_to_oom": "oom", "kv_share_over_mean": "kv_cache",
                         "device_retained_bytes": "retention", "device_fragmentation": "fragmentation"}


def aspect_of(f: Finding) -> str | None:
    """The aspect a finding belongs to, by its detector and metric."""
    if f.detector == "device_memory":
        return _DEVICE_METRIC_ASPECT.get(f.metric)
    metric = f.metric.lower()
    if any(w in metric for w in _OUTSIDE_WORDS) or (
            f.detector == "growth_curve" and ("outside" in metric or "allocat" in metric)):
        return "outside_cache"
    if "oom" in f.detector:
        return "oom"
    return _DETECTOR_ASPECT.get(f.detector)


@dataclass(frozen=True)
class Aspect:
    """One line of the verdict: what, how serious, a short label and the sentence with numbers."""

    name: str  # one of ASPECTS
    status: str  # one of STATUSES
    label: str  # e.g. "healthy linear", "leak", "12%"
    text: str

    @property
    def title(self) -> str:
        return ASPECT_TITLES.get(self.name, self.name)


def no_readings(facts: RunFacts | None, what: str = "allocator readings") -> str:
    """Why a measure is missing: a CPU run has none; a GPU run has none when no step was recorded
    (an OOM in the prefill, a generation that raised before its first step)."""
    on_gpu = facts is not None and (bool(facts.gpu_name) or "cuda" in str(facts.device or ""))
    return f"no {what} ({'no step was recorded on the GPU' if on_gpu else 'CPU run'})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _gens(ids: Sequence[int | None]) -> str:
    """`generation 0`, `generations 0-2`."""
    real = sorted({i for i in ids if i is not None})
    return f"generation{'s' if len(real) > 1 else ''} {span_text(real)}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if abs(x) < 0.1 else f"{x:.0%}"


def _worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=lambda s: _STATUS_RANK[s], default="ok")


def _status_of(findings: Sequence[Finding]) -> str:
    worst = max((f.rank for f in findings), default=-1)
    return {2: "critical", 1: "warning"}.get(worst, "ok")


# --- the five aspects --------------------------------------------------------------------------

def _kv_aspect(facts: RunFacts, fs: list[Finding]) -> Aspect:
    growth = [f for f in fs if f.detector == "growth_curve" and aspect_of(f) == "kv_cache"]
    superlinear = [f for f in growth if f.at_least("warning")]
    saturated = [f for f in growth if f.metric == "saturated_tokens"]
    density = [f for f in fs if f.detector == "cache_density"]
    status = _status_of([f for f in fs if aspect_of(f) == "kv_cache"])
    per_seq = " per sequence" if facts.batch_size and facts.batch_size > 1 else ""
    per_tok = (f"{human_bytes(facts.bytes_per_token)} per token of context{per_seq}" if facts.bytes_per_token
               else "no growth measured")
    types = ", ".join(f"{lt.layers} {lt.layer_type} layer{'s' if lt.layers != 1 else ''} of "
                      f"{human_bytes(lt.bytes_per_token) if lt.bytes_per_token else '-'} per token" for lt in
                      facts.layer_types)
    peak = f"{human_bytes(facts.peak_kv_bytes)} at most" if facts.peak_kv_bytes is not None else ""
    static_gens = facts.preallocated_generations
    # static when every generation preallocated its cache (or none grew); a run that mixes static and
    # dynamic generations is said to, never "static whatever the context"
    prealloc = bool(static_gens) and len(static_gens) >= max(facts.generations, 1)
    mixed = bool(static_gens) and not prealloc
    label_says = {"growth_curve"}  # detectors the label speaks for (its growth: superlinear, saturated)
    unseen = [f for f in fs if f.detector == "cache_seen" and f.metric == "no_cache_steps"]
    if unseen and len({f.gen_id for f in unseen}) >= max(facts.generations, 1):
        # Nothing was found to count: a "0 B" cache would read as healthy (or static) here.
        gens = span_text([f.gen_id for f in unseen if f.gen_id is not None])
        return Aspect("kv_cache", _worst([status, "warning"]), "no cache seen",
                      f"no cache seen: the recorder found no KV cache or recurrent state in "
                      f"{'generation' if len(unseen) == 1 else 'generations'} {gens}, so its 0 B of KV say nothing "
                      "about this model's memory")
    if superlinear:
        worst = max(superlinear, key=lambda f: f.value)
        where = "the step totals" if worst.layer is None else f"layer {worst.layer}"
        gens = span_text([f.gen_id for f in superlinear if f.gen_id is not None])
        label = "superlinear"
        text = (f"superlinear: {where} grow x{worst.value:.2f} faster per token at the end than at the start"
                f"{f' (generations {gens})' if gens else ''}; {per_tok} on average, {peak}")
    elif prealloc or (facts.generations and facts.flat_generations >= facts.generations):
        label = "static"
        text = f"static: preallocated, {human_bytes(facts.peak_kv_bytes)} whatever the context; {types}"
        waste = [f for f in fs if f.detector == "preallocation_waste" and f.at_least("warning")]
        if waste:
            label_says.add("preallocation_waste")
            worst = max(waste, key=lambda f: f.value)
            label = f"static, {worst.value:.1f}x the tokens held"
            text += (f"; capacity for {worst.value:.1f}x the tokens it holds "
                     f"({human_bytes(worst.evidence.get('wasted_bytes'))} never used)")
    elif mixed:
        label = "static and dynamic"
        gens = span_text(list(static_gens))
        text = (f"static and dynamic: a preallocated cache in generation{'s' if len(static_gens) > 1 else ''} {gens}, "
                f"growing in the others ({per_tok}); {peak}; {types}")
    elif saturated:
        window = int(max(f.value for f in saturated))
        sliding = {t for f in saturated for t in f.evidence.get("layer_types", [])}
        label = "saturating windows"
        growing = [lt for lt in facts.layer_types if lt.layer_type not in sliding]
        text = (f"saturating windows: {', '.join(sorted(sliding)) or 'sliding'} layers stop at {window:,} tokens"
                f"{', the others grow linearly' if growing else ''}; {per_tok} on average, {peak}; {types}")
        status = _worst([status, "note"])
    elif facts.bytes_per_token:
        label = "healthy linear"
        text = f"healthy linear: {per_tok}, {peak}; {types}"
    else:
        label = "no data"
        text = "no KV growth recorded (fewer than two steps per generation)"
        status = "n/a" if status == "ok" else status
    warn_density = [f for f in density if f.at_least("warning")]
    if warn_density:
        f = max(warn_density, key=lambda f: f.evidence.get("ratio") or 0)
        text += f"; {f.evidence.get('ratio', 0):.2f}x the geometry's bytes per token"
    elif density:
        text += "; as the geometry expects"
    odd = [f for f in fs if f.detector == "layer_anomaly" and f.at_least("warning")]
    if odd:
        text += f"; odd layer(s) {span_text([f.layer for f in odd if f.layer is not None])}"
    causes = _kv_causes(fs, label_says)
    if causes:
        named = ", ".join(dict.fromkeys(causes.values()))
        if superlinear or "preallocation_waste" in label_says:  # a label that is a fault itself leads
            label = f"{label}, {named}"
        else:  # the shape of the growth is not what needs action: the cause leads, the shape follows
            label = f"{named} ({'linear' if label == 'healthy linear' else label})"
        if text.startswith("healthy linear"):
            text = text.removeprefix("healthy ")
        text += "".join(f"; {cause}" for (detector, _), cause in causes.items() if detector not in _KV_TEXT_SAYS)
    return Aspect("kv_cache", status, label, text)


# Detectors whose finding the KV line's text already states (odd layers, density, capacity).
_KV_TEXT_SAYS = frozenset({"layer_anomaly", "cache_density", "preallocation_waste"})


def _layers_text(found: list[Finding]) -> str:
    """`layer 1`, `layers 3, 5`; empty for whole-model findings."""
    layers = sorted({f.layer for f in found if f.layer is not None})
    return f"layer{'s' if len(layers) > 1 else ''} {span_text(layers)}" if layers else ""


def _kv_causes(fs: list[Finding], label_says: set[str]) -> dict[tuple[str, str], str]:
    """Per (detector, metric), most serious first, a short name of its warnings about the cache, for the
    detectors its label does not already speak for (`label_says`): a dead head, an odd layer, a
    window not honoured..., so the headline names what needs action."""
    flagged = [f for f in fs if aspect_of(f) == "kv_cache" and f.at_least("warning")]
    causes: dict[tuple[str, str], str] = {}
    for f in sorted(flagged, key=lambda f: -f.rank):
        key = (f.detector, f.metric)
        if f.detector in label_says or key in causes:
            continue
        mine = [g for g in flagged if (g.detector, g.metric) == key]
        layers = _layers_text(mine)
        if key == ("dead_heads", "dead_kv_heads"):
            cause = f"dead KV heads in {layers}" if layers else "dead KV heads"
        elif f.detector == "layer_anomaly":
            cause = f"odd {layers}" if layers else "odd layer"
        elif key == ("layer_uniformity", "unsaturated_sliding_layers"):
            cause = "sliding window not honoured"
        elif f.detector == "cache_density":
            cause = f"{max(g.evidence.get('ratio') or 0 for g in mine):.2f}x the geometry's bytes per token"
        elif f.detector == "mla_latent":
            cause = "MLA latents not cached"
        elif f.detector == "preallocation_waste":
            cause = f"capacity {max(g.value for g in mine):.1f}x the tokens held"
        elif key == ("cache_seen", "no_cache_steps"):
            cause = f"no cache seen in {_gens([g.gen_id for g in mine])}"
        elif key == ("cache_seen", "unreadable_cache_steps"):
            cause = f"cache unreadable in {_gens([g.gen_id for g in mine])}"
        elif f.detector == "device_memory":
            cause = "one device holds more of the cache"
        else:
            cause = f"{f.detector} {f.metric}"
        causes[key] = cause
    return causes


def _positive_sum(values: Iterable[int | None]) -> int:
    return sum(max(v or 0, 0) for v in values)


def _retention_aspect(facts: RunFacts, fs: list[Finding]) -> Aspect:
    mine = [f for f in fs if f.detector == "post_eos"]
    status = _status_of(mine)
    gens = facts.retention
    if not gens or all(g.live_bytes is None for g in gens):
        if mine:
            return Aspect("retention", status, "see findings", mine[0].message)
        return Aspect("retention", "n/a", "not measured", "not measured: no GPU memory readings around generations")
    live = _positive_sum(g.live_bytes for g in gens)
    pools = _positive_sum(g.pool_bytes for g in gens)
    outside = _positive_sum(g.outside_bytes for g in gens)
    split = (f"live tensors {human_bytes(live)}, allocator pools {human_bytes(pools)}, "
             f"outside PyTorch {human_bytes(outside)}")
    n = len(gens)
    leak = [f for f in mine if f.at_least("warning")]
    if leak:
        worst = max(leak, key=lambda f: f.rank)
        cause = {"live_retention": "live tensors (a reference kept to outputs or the cache)",
                 "pool_retention": "allocator pools empty_cache() cannot release",
                 "outside_allocator_retention": "memory outside PyTorch's allocator"}.get(worst.metric, worst.metric)
        flagged = worst.evidence.get("generations") or sorted({f.gen_id for f in leak if f.gen_id is not None})
        on = f" after {len(flagged)} of {n} generations ({span_text(flagged)})" if flagged else ""
        label = "leak" if worst.severity == "critical" or len(flagged) > 1 else "retained"
        return Aspect("retention", status, f"{label}: {cause.split(' (')[0]}",
                      f"{label}: {cause}{on}; retained over the run: {split}")
    warm = [f for f in mine if f.evidence.get("warmup") or f.metric == "live_retention"]
    if mine:
        settled = [f for f in mine if f not in warm]
        after = (f"; smaller rises after {_gens([f.gen_id for f in settled])} level off" if settled else "")
        return Aspect("retention", _worst([status, "note"]), "warm-up",
                      f"warm-up: memory rose after {_gens([f.gen_id for f in warm])} (loaded on first use), not after every "
                      f"generation{after}; over {_plural(n, 'generation')}: {split}")
    return Aspect("retention", status, "none",
                  f"none: memory back to its baseline after each of {_plural(n, 'generation')} ({split})")


def _fragmentation_aspect(facts: RunFacts, fs: list[Finding]) -> Aspect:
    mine = [f for f in fs if f.detector == "fragmentation"]
    status = _status_of(mine)
    if facts.mean_fragmentation is None:
        return Aspect("fragmentation", "n/a", "not measured", f"not measured: {no_readings(facts)}")
    ratio = facts.mean_fragmentation
    retries = facts.alloc_retries or 0
    text = (f"{_pct(ratio)} of reserved memory unused on average ({human_bytes(facts.max_unused_bytes)} at most, "
            f"{human_bytes(facts.max_inactive_split_bytes)} in split blocks); "
            f"{'no allocator retries' if not retries else _plural(retries, 'allocator retry').replace('retrys', 'retries')}")
    label = _pct(ratio)
    cached = [f for f in mine if f.severity == "info" and f.metric == "mean_fragmentation"]
    if status in ("warning", "critical"):
        label = f"high, {_pct(ratio)}"
        flagged = [f for f in mine if f.at_least("warning")]
        means = [f for f in flagged if f.metric == "mean_fragmentation"]
        worst = max(means or flagged, key=lambda f: (f.rank, f.value))
        advice = worst.message.rsplit("; ", 1)[-1] if means else "memory is nearly exhausted."
        text = f"high on {_gens([f.gen_id for f in flagged])}: {text}; {advice}"
    elif cached:
        label = f"{_pct(ratio)}, cached before"
        before = max(f.evidence.get("cached_before_bytes") or 0 for f in cached)
        gens = [f.gen_id for f in cached if f.gen_id is not None]
        text = (f"{text}; {_gens(gens)} {'starts' if len(gens) == 1 else 'start'} with "
                f"{human_bytes(before)} already cached: not fragmentation, empty_cache() before generating frees it")
        status = "note"
    else:
        text = f"low: {text}"
    return Aspect("fragmentation", status, label, text)


def _outside_aspect(facts: RunFacts, fs: list[Finding]) -> Aspect:
    mine = [f for f in fs if aspect_of(f) == "outside_cache"]
    status = _status_of(mine)
    if facts.non_kv_allocated_bytes is None:
        if mine:
            return Aspect("outside_cache", status, "see findings", mine[0].message)
        return Aspect("outside_cache", "n/a", "not measured", f"not measured: {no_readings(facts)}")
    parts = [f"{human_bytes(facts.non_kv_allocated_bytes)} allocated beside the cache (weights, activations)"]
    if facts.unused_reserved_bytes is not None:
        parts.append(f"{human_bytes(facts.unused_reserved_bytes)} reserved unused")
    if facts.outside_torch_bytes is not None:
        parts.append(f"{human_bytes(facts.outside_torch_bytes)} outside PyTorch (CUDA context, libraries)")
    text = ", ".join(parts) + " at the allocated peak"
    label = human_bytes(facts.non_kv_allocated_bytes)
    if facts.peak_kv_bytes and facts.peak_allocated_bytes:
        share = facts.peak_kv_bytes / facts.peak_allocated_bytes
        text += f"; the cache is {share:.1%} of allocated memory"
    flagged = [f for f in mine if f.at_least("warning")]
    if flagged:
        worst = max(flagged, key=lambda f: f.rank)
        grown = [f.evidence["outside_grown_bytes"] for f in flagged if f.evidence.get("outside_grown_bytes")]
        # what grew during a generation, not the memory beside the cache at the peak (weights included)
        how = "superlinearly" if any(f.metric == "outside_marginal_rate_ratio" for f in flagged) else "linearly"
        label = f"grows {how}, +{human_bytes(max(grown))} in a generation" if grown else f"grows: {label}"
        text = f"{worst.message} ({text})"
    return Aspect("outside_cache", status, label, text)


def _oom_aspect(facts: RunFacts, fs: list[Finding]) -> Aspect:
    mine = [f for f in fs if aspect_of(f) == "oom"]
    status = _status_of(mine)
    if facts.oom_events:
        status = "critical"
    ran_out = [f for f in mine if f.severity == "critical"]
    forecasts = [f for f in mine if f.detector == "oom_forecast"]
    if ran_out or facts.oom_events:
        n = facts.oom_events or len({(f.gen_id, f.detector) for f in ran_out if f.detector != "oom_forecast"}) \
            or len({f.gen_id for f in ran_out})
        ran_out.sort(key=lambda f: f.detector == "oom_forecast")  # the OOM's own finding says more
        why = ran_out[0].message if ran_out else "the trace holds out-of-memory events"
        return Aspect("oom", status, "ran out", f"ran out of memory ({_plural(n, 'OOM')}): {why}")
    first_device = [f for f in mine if f.detector == "device_memory" and f.metric == "first_device_tokens_to_oom"]
    if first_device:
        # split over devices: the device that runs out first is the forecast, not the sum
        f = min(first_device, key=lambda f: f.value)
        label = f"{f.evidence.get('device')} first, {f.value:,.0f} tokens"
        return Aspect("oom", status, f"close, {label}" if status in ("warning", "critical") else label, f.message)
    if not forecasts:
        if facts.total_bytes is None:
            return Aspect("oom", "n/a", "not forecast", "not forecast: the trace has no device total (CPU, no NVML)")
        return Aspect("oom", status, "not forecast", "not forecast: no growth or no memory readings")
    tokens = [f.value for f in forecasts if f.metric == "tokens_to_oom"]
    batches = [f.evidence.get("max_batch_size") for f in forecasts]
    batch = min((b for b in batches if b is not None), default=None)
    headroom = min((f.evidence.get("headroom_bytes") for f in forecasts if f.evidence.get("headroom_bytes") is not None),
                   default=None)
    total = next((f.evidence.get("total_bytes") for f in forecasts if f.evidence.get("total_bytes")), None)
    bits = []
    if tokens:
        bits.append(f"at about {min(tokens):,.0f} tokens of context")
    if batch is not None:
        bits.append(f"at batch size {batch + 1:,} with {facts.max_context or 0:,} tokens")
    where = " or ".join(bits) if bits else "not from cache growth"
    label = f"{min(tokens):,.0f} tokens" if tokens else (f"batch {batch + 1:,}" if batch is not None else "-")
    text = f"would run out {where}"
    if headroom is not None and total:
        text += f"; {human_bytes(headroom)} free of {human_bytes(total)} at the peak"
    if status in ("warning", "critical"):
        text = f"close: {text}; shorten the context, lower the batch or quantise the cache"
        label = f"close, {label}"
    return Aspect("oom", status, label, text)


def run_context(facts: RunFacts) -> str:
    """"4 generations, 24 layers, up to 255 tokens, NVIDIA H200": what the run was."""
    bits = [_plural(facts.generations, "generation")]
    if facts.num_layers:
        bits.append(_plural(int(facts.num_layers), "layer"))
    if facts.max_context:
        bits.append(f"up to {facts.max_context:,} tokens")
    if facts.batch_size and facts.batch_size > 1:
        bits.append(f"batch {facts.batch_size}")
    if facts.gpu_name:
        bits.append(str(facts.gpu_name))
    elif facts.device:
        bits.append(str(facts.device))
    return ", ".join(bits)


def run_aspects(facts: RunFacts, fs: list[Finding]) -> tuple[Aspect, ...]:
    """The five aspects of one run, in `ASPECTS` order, from its facts and its findings."""
    return (_kv_aspect(facts, fs), _retention_aspect(facts, fs), _fragmentation_aspect(facts, fs),
            _outside_aspect(facts, fs), _oom_aspect(facts, fs))
