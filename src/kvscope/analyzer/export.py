"""Exports of a trace for other tools: Perfetto / Chrome trace-event JSON and Prometheus text.

`perfetto_trace(tables)`: the Trace Event Format that ui.perfetto.dev and chrome://tracing open.
One process per run; counter tracks (`"ph": "C"`) for allocated, reserved and NVML used bytes and
the KV bytes of each layer type, one value per step; complete slices (`"ph": "X"`) for each
generation and each step (a step lasts from the previous step's end, or its generation's start, to
its own end); instant events (`"ph": "i"`) for OOMs, markers and the other events. Timestamps are
microseconds since the run started (the trace's nanoseconds / 1000), so they line up with the
trace's `t_ns`.

`prometheus_text(tables, findings)`: the last readings, peaks and finding counts in the Prometheus
text exposition format, for a node exporter's textfile collector: every name starts `kvscope_`,
units are base units (`_bytes`, `_ratio`), every metric has `# HELP` and `# TYPE`, labels are
few and low-cardinality (model, run, layer_type, cause, severity, detector).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kvscope.analyzer.findings import SEVERITIES, Finding
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.run_facts import RunFacts, run_facts

TID_GENERATIONS, TID_STEPS, TID_EVENTS = 1, 2, 3


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _us(ns: int | float) -> float:
    return ns / 1000.0


def _detail(raw: Any) -> Any:
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def perfetto_events(t: LoadedTraces) -> list[dict[str, Any]]:
    """The trace events of every run (metadata, counters, slices, instants), in time order per run."""
    runs = t.records("SELECT run_id, any_value(model_name) AS model FROM run GROUP BY run_id ORDER BY run_id")
    known = {r["run_id"] for r in runs}
    runs += [{"run_id": r["run_id"], "model": "?"} for r in t.records("SELECT DISTINCT run_id FROM steps ORDER BY 1")
             if r["run_id"] not in known]
    events: list[dict[str, Any]] = []
    for pid, run in enumerate(runs, start=1):
        rid = _q(run["run_id"])
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": f"{run['model']} (run {run['run_id']})"}})
        for tid, name in ((TID_GENERATIONS, "generations"), (TID_STEPS, "steps"), (TID_EVENTS, "events")):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        gens = {g["gen_id"]: g for g in t.records(
            f"SELECT * FROM generations WHERE run_id = {rid} ORDER BY gen_id")}
        for g in gens.values():
            events.append({"ph": "X", "name": f"generation {g['gen_id']}", "cat": "generation", "pid": pid,
                           "tid": TID_GENERATIONS, "ts": _us(g["started_ns"]),
                           "dur": _us(max(g["ended_ns"] - g["started_ns"], 0)),
                           "args": {"gen_id": g["gen_id"], "prompt_id": g["prompt_id"],
                                    "prompt_tokens": g["prompt_tokens"], "new_tokens": g["new_tokens"],
                                    "cache_class": g["cache_class"]}})
        steps = t.records(f"""
            SELECT gen_id, step, t_ns, seq_len, kv_bytes, allocated_bytes, reserved_bytes, nvml_used_bytes,
                   lag(t_ns) OVER (PARTITION BY gen_id ORDER BY step) AS prev_ns
            FROM steps WHERE run_id = {rid} ORDER BY t_ns, gen_id, step""")
        by_type = {(r["gen_id"], r["step"]): r["kv"] for r in t.records(f"""
            SELECT gen_id, step, map_from_entries(list(struct_pack(k := layer_type, v := kv))) AS kv
            FROM (SELECT gen_id, step, layer_type, sum(kv_bytes) AS kv FROM layers WHERE run_id = {rid}
                  GROUP BY ALL) GROUP BY gen_id, step""")}
        for s in steps:
            ts = _us(s["t_ns"])
            start = s["prev_ns"] if s["prev_ns"] is not None else gens.get(s["gen_id"], {}).get("started_ns", s["t_ns"])
            events.append({"ph": "X", "name": "prefill" if s["step"] == 0 else "decode", "cat": "step", "pid": pid,
                           "tid": TID_STEPS, "ts": _us(start), "dur": _us(max(s["t_ns"] - start, 0)),
                           "args": {"gen_id": s["gen_id"], "step": s["step"], "seq_len": s["seq_len"],
                                    "kv_bytes": s["kv_bytes"]}})
            for name in ("allocated_bytes", "reserved_bytes", "nvml_used_bytes"):
                if s[name] is not None:
                    events.append({"ph": "C", "name": name, "pid": pid, "tid": 0, "ts": ts, "args": {"bytes": s[name]}})
            for layer_type, kv in sorted((by_type.get((s["gen_id"], s["step"])) or {}).items()):
                events.append({"ph": "C", "name": f"kv_bytes {layer_type}", "pid": pid, "tid": 0, "ts": ts,
                               "args": {"bytes": int(kv)}})
        for ev in t.records(f"SELECT * FROM events WHERE run_id = {rid} AND kind <> 'flush' ORDER BY t_ns"):
            events.append({"ph": "i", "s": "p", "name": str(ev["kind"]), "cat": "event", "pid": pid,
                           "tid": TID_EVENTS, "ts": _us(ev["t_ns"]),
                           "args": {"gen_id": ev["gen_id"], "step": ev["step"], "detail": _detail(ev["detail"])}})
    return events


def perfetto_trace(t: LoadedTraces) -> dict[str, Any]:
    """The whole JSON object: {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}."""
    return {"traceEvents": perfetto_events(t), "displayTimeUnit": "ms",
            "otherData": {"source": "kvscope", "traces": [str(p) for p in t.paths],
                          "time": "microseconds since each run started"}}


# --- Prometheus --------------------------------------------------------------------------------

def _label_value(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, object]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _number(x: float | int) -> str:
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(float(x))


class _Exposition:
    def __init__(self) -> None:
        self.metrics: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, help_text: str, labels: dict[str, object], value: float | int | None,
            kind: str = "gauge") -> None:
        if value is None:
            return
        full = f"kvscope_{name}"
        entry = self.metrics.setdefault(full, (help_text, kind, []))
        entry[2].append(f"{full}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        lines = []
        for name, (help_text, kind, samples) in self.metrics.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def prometheus_text(t: LoadedTraces, findings: Sequence[Finding], facts: Sequence[RunFacts] | None = None) -> str:
    """Last readings, peaks, retention and finding counts per run, in the text exposition format."""
    facts = list(facts) if facts is not None else run_facts(t)
    last = {r["run_id"]: r for r in t.records("""
        SELECT run_id, gen_id, step, kv_bytes, allocated_bytes, reserved_bytes, nvml_used_bytes, nvml_total_bytes,
               seq_len
        FROM steps QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY t_ns DESC, gen_id DESC, step DESC) = 1""")}
    per_type: dict[str, dict[str, int]] = {}
    for r in t.records("""
        SELECT l.run_id, l.layer_type, sum(l.kv_bytes) AS kv FROM layers l
        JOIN (SELECT run_id, gen_id, step FROM steps
              QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY t_ns DESC, gen_id DESC, step DESC) = 1) s
          USING (run_id, gen_id, step)
        GROUP BY ALL ORDER BY ALL"""):
        per_type.setdefault(r["run_id"], {})[str(r["layer_type"])] = int(r["kv"])
    out = _Exposition()
    for f in facts:
        base = {"model": f.model_name, "run": f.run_id}
        row = last.get(f.run_id, {})
        out.add("kv_cache_bytes", "KV cache bytes (all layers, each storage once) at the run's last step.", base,
                row.get("kv_bytes"))
        for layer_type, kv in sorted(per_type.get(f.run_id, {}).items()):
            out.add("kv_cache_layer_type_bytes", "KV cache bytes of the layers of one type at the run's last step.",
                    {**base, "layer_type": layer_type}, kv)
        out.add("kv_cache_peak_bytes", "Largest KV cache of the run (steps.kv_bytes).", base, f.peak_kv_bytes)
        out.add("kv_cache_per_token_bytes", "Bytes the KV cache grows by per token of context and sequence (median slope over decode steps).", base,
                f.bytes_per_token)
        out.add("context_tokens", "Tokens of context at the run's last step.", base, row.get("seq_len"))
        out.add("allocated_bytes", "PyTorch allocated bytes at the run's last step.", base, row.get("allocated_bytes"))
        out.add("reserved_bytes", "PyTorch reserved bytes at the run's last step.", base, row.get("reserved_bytes"))
        out.add("nvml_used_bytes", "Device memory used (NVML) at the run's last step.", base,
                row.get("nvml_used_bytes"))
        out.add("device_total_bytes", "Device memory in all (NVML).", base, f.total_bytes)
        out.add("peak_allocated_bytes", "Largest PyTorch allocated bytes of the run.", base, f.peak_allocated_bytes)
        out.add("peak_reserved_bytes", "Largest PyTorch reserved bytes of the run.", base, f.peak_reserved_bytes)
        out.add("peak_nvml_used_bytes", "Largest NVML used bytes of the run.", base, f.peak_nvml_bytes)
        out.add("fragmentation_ratio", "Mean (reserved - allocated) / reserved over the run's steps.", base,
                f.mean_fragmentation)
        if f.retention and any(g.live_bytes is not None for g in f.retention):
            for cause, attr in (("live_tensors", "live_bytes"), ("allocator_pools", "pool_bytes"),
                                ("outside_pytorch", "outside_bytes")):
                values = [getattr(g, attr) for g in f.retention if getattr(g, attr) is not None]
                out.add("retained_bytes", "Bytes above baseline after the generations ended and empty_cache() ran, "
                        "summed over the run's generations, by cause.", {**base, "cause": cause},
                        sum(max(v, 0) for v in values))
        out.add("generations", "Generations (generate() calls) in the run.", base, f.generations)
        out.add("oom_events", "Out-of-memory events recorded in the run.", base, f.oom_events)
        mine = [x for x in findings if x.run_id == f.run_id]
        for severity in SEVERITIES:
            out.add("findings", "Findings of the analysis, by severity (0 when none).", {**base, "severity": severity},
                    sum(1 for x in mine if x.severity == severity))
        for severity in SEVERITIES:
            for detector in sorted({x.detector for x in mine if x.severity == severity}):
                out.add("detector_findings", "Findings of the analysis, by severity and detector.",
                        {**base, "severity": severity, "detector": detector},
                        sum(1 for x in mine if x.severity == severity and x.detector == detector))
        oom = [x for x in mine if x.detector == "oom_forecast" and x.metric == "tokens_to_oom"]
        if oom:
            out.add("oom_forecast_tokens", "Tokens of context at which the device would run out (oom_forecast, "
                    "the smallest over the generations).", base, min(x.value for x in oom))
    return out.text()
