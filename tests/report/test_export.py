"""kvscope export: Perfetto trace-event JSON (structure, and counter values equal to the trace's) and
Prometheus text (parsed by prometheus_client's own parser)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvscope.cli.main import main
from kvscope.trace.synth import SynthSpec, build_synthetic_trace
from kvscope.trace.writer import TraceWriter

PHASES = {"M", "C", "X", "i"}


def _rows(trace: Path, table: str) -> list[dict]:
    return [r for part in sorted((trace / table).glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]


@pytest.fixture
def trace_with_events(tmp_path: Path) -> Path:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(
        run_id="r1", generations=2, steps=40, layer_types=("sliding_attention", "full_attention") * 2,
        sliding_window=32))
    steps = sorted(_rows(trace, "steps"), key=lambda r: (r["gen_id"], r["step"]))
    with TraceWriter(trace) as w:
        w.extend("events", {"run_id": ["r1", "r1", "r1"], "gen_id": [1, 0, None], "step": [7, 3, None],
                            "t_ns": [steps[40 + 7]["t_ns"], steps[3]["t_ns"], steps[-1]["t_ns"] + 5],
                            "kind": ["oom", "marker", "flush"],
                            "detail": [json.dumps({"bytes": 1 << 30}), json.dumps({"label": "<b>mark</b>"}), "{}"]})
    return trace


def test_perfetto_structure_and_counter_values(trace_with_events: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    assert main(["export", str(trace_with_events), "--perfetto", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    assert doc["displayTimeUnit"] == "ms" and isinstance(events, list)
    for ev in events:  # the trace-event format's required fields per phase
        assert ev["ph"] in PHASES and isinstance(ev["name"], str) and isinstance(ev["pid"], int)
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0 and "tid" in ev
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
        if ev["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in ev["args"].values())
        if ev["ph"] == "i":
            assert ev["s"] in ("g", "p", "t")
    steps = sorted(_rows(trace_with_events, "steps"), key=lambda r: (r["gen_id"], r["step"]))
    layers = _rows(trace_with_events, "layers")
    counters: dict[str, dict[float, int]] = {}
    for ev in events:
        if ev["ph"] == "C":
            counters.setdefault(ev["name"], {})[ev["ts"]] = ev["args"]["bytes"]
    assert set(counters) == {"allocated_bytes", "reserved_bytes", "nvml_used_bytes", "kv_bytes full_attention",
                             "kv_bytes sliding_attention"}
    for name in ("allocated_bytes", "reserved_bytes", "nvml_used_bytes"):
        assert counters[name] == {s["t_ns"] / 1000: s[name] for s in steps}
    t_of = {(s["gen_id"], s["step"]): s["t_ns"] / 1000 for s in steps}
    for kind in ("full_attention", "sliding_attention"):
        expected: dict[float, int] = {}
        for r in layers:
            if r["layer_type"] == kind:
                ts = t_of[(r["gen_id"], r["step"])]
                expected[ts] = expected.get(ts, 0) + r["kv_bytes"]
        assert counters[f"kv_bytes {kind}"] == expected
    assert max(counters["kv_bytes sliding_attention"].values()) == 2 * 31 * 2 * 8 * 64 * 2  # 2 layers at W - 1
    gens = sorted(_rows(trace_with_events, "generations"), key=lambda g: g["gen_id"])
    slices = [e for e in events if e["ph"] == "X" and e["cat"] == "generation"]
    assert [(e["ts"], e["dur"]) for e in slices] == [(g["started_ns"] / 1000, (g["ended_ns"] - g["started_ns"]) / 1000)
                                                     for g in gens]
    step_slices = [e for e in events if e["ph"] == "X" and e["cat"] == "step"]
    assert len(step_slices) == len(steps) and [e["name"] for e in step_slices[:2]] == ["prefill", "decode"]
    assert all(e["ts"] + e["dur"] == pytest.approx(t_of[(e["args"]["gen_id"], e["args"]["step"])])
               for e in step_slices)
    instants = [(e["name"], e["ts"], e["args"]["detail"]) for e in events if e["ph"] == "i"]
    assert instants == [("marker", steps[3]["t_ns"] / 1000, {"label": "<b>mark</b>"}),
                        ("oom", steps[47]["t_ns"] / 1000, {"bytes": 1 << 30})]  # flushes left out


def test_prometheus_text_parses_and_holds_the_readings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    name = 'llama "quoted" \\ back\nslash'
    trace = build_synthetic_trace(tmp_path / "leaky", SynthSpec(run_id="leaky", generations=3, retention=0.3,
                                                              model_name=name))
    assert main(["export", str(trace), "--prometheus"]) == 0
    text = capsys.readouterr().out
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(n.startswith("kvscope_") for n in families)
    assert all(f.type == "gauge" and f.documentation for f in families.values())
    assert all(f"# HELP {n} " in text and f"# TYPE {n} gauge" in text for n in families)
    assert all(n.endswith(("_bytes", "_ratio", "_tokens", "findings", "generations", "events")) for n in families)
    allowed = {"model", "run", "layer_type", "cause", "severity", "detector"}
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model", "run")))): s
               for f in families.values() for s in f.samples}
    assert all(set(s.labels) <= allowed and s.labels["model"] == name and s.labels["run"] == "leaky"
               for s in samples.values())
    steps = _rows(trace, "steps")
    last = max(steps, key=lambda s: s["t_ns"])
    assert samples[("kvscope_allocated_bytes", ())].value == last["allocated_bytes"]
    assert samples[("kvscope_kv_cache_bytes", ())].value == last["kv_bytes"]
    assert samples[("kvscope_kv_cache_layer_type_bytes", (("layer_type", "full_attention"),))].value == last["kv_bytes"]
    assert samples[("kvscope_peak_reserved_bytes", ())].value == max(s["reserved_bytes"] for s in steps)
    gens = _rows(trace, "generations")
    live = sum(g["post_empty_cache_allocated_bytes"] - g["baseline_allocated_bytes"] for g in gens)
    assert samples[("kvscope_retained_bytes", (("cause", "live_tensors"),))].value == live
    assert samples[("kvscope_findings", (("severity", "critical"),))].value == 1
    assert samples[("kvscope_findings", (("severity", "warning"),))].value == 0
    assert samples[("kvscope_detector_findings", (("detector", "post_eos"), ("severity", "critical")))].value == 1
    assert 0 <= samples[("kvscope_fragmentation_ratio", ())].value < 0.05


def test_export_usage_errors(tmp_path: Path, trace_with_events: Path) -> None:
    assert main(["export", str(trace_with_events)]) == 2  # neither --perfetto nor --prometheus
    assert main(["export"]) == 2
    assert main(["export", str(trace_with_events), "--perfetto", "-o", str(tmp_path)]) == 2
    assert main(["export", str(tmp_path / "nope"), "--prometheus"]) == 2
