"""The verdict: golden text at 80 and 120 columns, the JSON object, the Python API, the rules behind it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kvscope
from kvscope.analyzer.findings import Finding, metric_value_text, span_text
from kvscope.analyzer.report import verdict_text
from kvscope.analyzer.run_facts import GenerationMemory, RunFacts
from kvscope.analyzer.verdict import build_verdict, group_findings
from kvscope.cli.main import main
from kvscope.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KVSCOPE_UPDATE_GOLDEN") == "1"  # rewrite the golden files instead of comparing


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text + "\n")
    assert path.exists(), f"missing golden file {path} (run with KVSCOPE_UPDATE_GOLDEN=1 and review it)"
    assert text + "\n" == path.read_text(), f"verdict differs from {path}"


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("name", ["healthy", "leaking", "fragmented"])
def test_verdict_golden(named_traces: dict[str, Path], name: str, width: int) -> None:
    text = verdict_text(kvscope.analyze(named_traces[name]).verdict, width)
    for line in text.splitlines():
        assert len(line) <= width, line
        assert line == line.rstrip()
    _check_golden(f"{name}-{width}.txt", text)


def test_verdict_says_what_each_trace_is(named_traces: dict[str, Path]) -> None:
    healthy = kvscope.analyze(named_traces["healthy"]).verdict.worst
    assert healthy is not None and healthy.headline == "healthy" and healthy.healthy
    assert healthy.aspect("kv_cache").label == "healthy linear"
    assert healthy.aspect("retention").label == "warm-up"  # the synthetic warm-up outside the allocator
    assert healthy.aspect("fragmentation").status == "ok"
    leaking = kvscope.analyze(named_traces["leaking"]).verdict.worst
    assert leaking is not None and leaking.severity == "critical"
    retention = leaking.aspect("retention")
    assert retention.status == "critical" and retention.label.startswith("leak: live tensors")
    assert "3 of 3 generations" in retention.text and "live tensors 58.94 MiB" in retention.text
    assert [(g.detector, g.metric) for g in leaking.action] == [("post_eos", "live_retention")]
    fragmented = kvscope.analyze(named_traces["fragmented"]).verdict.worst
    assert fragmented is not None and fragmented.aspect("fragmentation").status == "warning"
    assert fragmented.aspect("fragmentation").label == "high, 26%"
    assert "739.72 MiB" in fragmented.aspect("fragmentation").text


def test_folder_gives_one_line_per_run_then_the_worst(named_traces: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "traces"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "3 runs: 1 critical, 1 warning, 1 healthy"
    assert lines[1].startswith("  CRITICAL leaking: ")
    assert any(line.startswith("  WARNING  fragmented: ") for line in lines)
    assert any(line.startswith("  ok       healthy: healthy") for line in lines)
    assert "worst run:" in lines and lines[lines.index("worst run:") + 1].startswith("llama-like, run leaking")
    assert lines[-1] == "39 finding(s): 1 critical, 2 warning, 36 info"


def test_text_in_a_pipe_and_no_empty_table(named_traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "traces/healthy", "-d", "growth_curve"]) == 0  # healthy growth: no finding at all
    out = capsys.readouterr().out
    assert "healthy linear" in out and "needs action: nothing" in out
    assert "┃" not in out and "│" not in out  # no table drawn
    assert out.rstrip().endswith("0 finding(s): 0 critical, 0 warning, 0 info")
    assert main(["analyze", "traces/healthy", "-d", "growth_curve", "--format", "markdown"]) == 0
    assert capsys.readouterr().out.strip() == "No findings."


def test_json_stays_an_array_and_json_verdict_carries_the_verdict(named_traces: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "traces/leaking", "--format", "json"]) == 0
    array = json.loads(capsys.readouterr().out)
    assert isinstance(array, list) and len(array) == 13
    assert main(["analyze", "traces/leaking", "--format", "json-verdict"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["findings"] == array
    assert obj["verdict"]["severity"] == "critical" and obj["verdict"]["worst_run"] == "leaking"
    run = obj["verdict"]["runs"][0]
    assert set(run["aspects"]) == {"kv_cache", "retention", "fragmentation", "outside_cache", "oom"}
    assert run["aspects"]["retention"]["status"] == "critical"
    assert run["facts"]["bytes_per_token"] == 8192 and run["facts"]["generations"] == 3
    assert [g["metric"] for g in run["action"]] == ["live_retention"]


def test_python_api_takes_plain_dicts(named_traces: dict[str, Path]) -> None:
    leaking = named_traces["leaking"]
    result = kvscope.analyze(leaking)
    assert not result.healthy and [f.detector for f in result.at_least("critical")] == ["post_eos"]
    relaxed = kvscope.analyze(str(leaking), config={"post_eos": {"live_threshold": 0.6,
                                                                  "repeat_threshold": 0.6}})
    assert relaxed.healthy and relaxed.verdict.worst.headline == "healthy"
    only = kvscope.analyze([leaking], detectors=["post_eos"])
    assert {f.detector for f in only.findings} == {"post_eos"}
    assert json.loads(json.dumps(only.to_dict()))["verdict"]["worst_run"] == "leaking"
    with pytest.raises(UsageError, match="no threshold"):
        kvscope.analyze(leaking, config={"post_eos": {"nope": 1}})
    with pytest.raises(UsageError, match="not among the selected"):
        kvscope.analyze(leaking, detectors=["post_eos"], config={"fragmentation": {"max_mean_fraction": 0.5}})
    with pytest.raises(UsageError, match="unknown detector"):
        kvscope.analyze(leaking, config={"kv_leak": {}})


def test_import_kvscope_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, kvscope; print(sorted(m for m in ('torch', 'duckdb', 'polars') if m in sys.modules)); "
            "kvscope.analyze; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]  # nothing heavy on import; the analyser never pulls torch


def test_grouping_merges_generations_with_ranges() -> None:
    fs = [Finding("oom_forecast", "info", "r", g, None, "tokens_to_oom", v, None, f"m{g}")
          for g, v in ((0, 413773.3), (1, 413690.7), (3, 413717.0))]
    fs.append(Finding("post_eos", "critical", "r", None, None, "live_retention", 0.3, 0.1, "leak"))
    groups = group_findings(fs)
    assert [(g.detector, g.count, g.generations_text) for g in groups] == [("post_eos", 1, ""),
                                                                            ("oom_forecast", 3, "0-1, 3")]
    assert metric_value_text("tokens_to_oom", groups[1].value_max) == "413,773"  # never cut to 4.138
    assert metric_value_text("mean_fragmentation", 0.8849) == "88%"
    assert metric_value_text("bytes_per_token_per_layer", 8192) == "8.00 KiB"
    assert span_text([4, 0, 1, 2, 7]) == "0-2, 4, 7"


def test_unknown_detectors_and_new_metrics_are_tolerated() -> None:
    facts = RunFacts("r", "m", generations=2, steps=10, bytes_per_token=1024.0, peak_kv_bytes=1 << 20,
                     non_kv_allocated_bytes=1 << 30, peak_allocated_bytes=(1 << 30) + (1 << 20),
                     retention=(GenerationMemory(0, 0, 0, 1 << 20), GenerationMemory(1, 0, 0, 0)))
    fs = [Finding("oom_event", "critical", "r", 1, None, "ooms", 1, 0, "the run ran out of memory at step 7."),
          Finding("growth_curve", "warning", "r", 0, None, "outside_marginal_rate_ratio", 1.6, 1.25,
                  "the cache grows linearly; something outside it grows 4.00 KiB per token."),
          Finding("post_eos", "info", "r", 0, None, "outside_allocator_retention", 0.2, 0.05, "warm-up."),
          Finding("someone_elses", "warning", "r", None, 3, "odd", 2.0, 1.0, "something odd.")]
    run = build_verdict(fs, [facts]).worst
    assert run is not None and run.severity == "critical"
    assert run.aspect("oom").status == "critical" and run.aspect("oom").label == "ran out"
    assert run.aspect("outside_cache").status == "warning" and "4.00 KiB per token" in run.aspect("outside_cache").text
    assert run.aspect("kv_cache").status == "ok"  # the outside-the-cache growth is not the cache's
    assert run.aspect("retention").label == "warm-up"  # post_eos's "outside the allocator" stays retention
    assert {g.detector for g in run.action} == {"oom_event", "growth_curve", "someone_elses"}
    assert "ran out" in verdict_text(build_verdict(fs, [facts]), 80)


def test_an_oom_event_makes_the_forecast_ran_out(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from kvscope.trace.synth import SynthSpec, build_synthetic_trace
    from kvscope.trace.writer import TraceWriter

    trace = build_synthetic_trace(tmp_path / "oom", SynthSpec(run_id="oom", generations=2))
    steps = sorted((r for part in (trace / "steps").glob("part-*.parquet") for r in pq.read_table(part).to_pylist()),
                   key=lambda r: (r["gen_id"], r["step"]))
    with TraceWriter(trace) as w:
        w.extend("events", {"run_id": ["oom"], "gen_id": [1], "step": [100], "t_ns": [steps[228]["t_ns"]],
                            "kind": ["oom"], "detail": [json.dumps({"tried_bytes": 1 << 30})]})
    run = kvscope.analyze(trace).verdict.worst
    assert run is not None and run.severity == "critical" and run.headline == "OOM forecast: ran out"
    oom = run.aspect("oom")
    assert oom.status == "critical" and oom.text.startswith("ran out of memory (1 OOM): ")


def test_a_run_mixing_static_and_dynamic_generations_is_not_called_static() -> None:
    from kvscope.analyzer.run_facts import LayerTypeFacts

    facts = RunFacts(run_id="r", model_name="m", generations=4, steps=200, batch_size=3, peak_kv_bytes=18 << 20,
                     bytes_per_token=36 * 1024.0, preallocated_generations=(2,),
                     layer_types=(LayerTypeFacts("full_attention", 3, 4096.0, 200, 1 << 20),))
    kv = build_verdict([], [facts]).worst.aspect("kv_cache")
    assert kv.label == "static and dynamic"
    assert kv.text.startswith("static and dynamic: a preallocated cache in generation 2, growing in the others "
                              "(36.00 KiB per token of context per sequence)")
    every = build_verdict([], [RunFacts(**{**facts.__dict__, "preallocated_generations": (0, 1, 2, 3)})])
    assert every.worst.aspect("kv_cache").label == "static"


def test_a_warning_about_the_cache_is_named_in_the_headline_not_hidden_behind_its_growth() -> None:
    facts = RunFacts("r", "m", generations=2, steps=10, bytes_per_token=1024.0, peak_kv_bytes=1 << 20)
    dead = Finding("dead_heads", "warning", "r", None, 1, "dead_kv_heads", 1, 0.05, "kv head 1 of layer 1 is dead.")
    run = build_verdict([dead], [facts]).worst
    kv = run.aspect("kv_cache")
    assert (kv.status, kv.label) == ("warning", "dead KV heads in layer 1 (linear)")
    assert kv.text.startswith("linear: 1.00 KiB per token") and kv.text.endswith("; dead KV heads in layer 1")
    assert run.headline == "KV cache: dead KV heads in layer 1 (linear)"
    odd = [Finding("layer_anomaly", "warning", "r", g, layer, "robust_z", 9.0, 3.5, "odd.")
           for g in (0, 1) for layer in (3, 5)]
    window = Finding("layer_uniformity", "warning", "r", 0, None, "unsaturated_sliding_layers", 4, 0, "not honoured.")
    kv = build_verdict([*odd, window], [facts]).worst.aspect("kv_cache")
    assert kv.label == "odd layers 3, 5, sliding window not honoured (linear)"
    assert kv.text.endswith("; odd layer(s) 3, 5; sliding window not honoured")
    healthy = build_verdict([Finding("dead_heads", "info", "r", None, 1, "dead_kv_heads", 0, 0.05, "none.")], [facts])
    assert healthy.worst.aspect("kv_cache").label == "healthy linear" and healthy.worst.headline == "healthy"


def test_a_gpu_run_without_steps_is_not_called_a_cpu_run() -> None:
    # an OOM in the prefill: no step, so no allocator readings, on a GPU
    oom = Finding("oom_event", "critical", "r", 0, None, "oom_step", 0, None, "ran out in the prefill.")
    gpu = build_verdict([oom], [RunFacts("r", "m", gpu_name="NVIDIA H200", device="cuda:0")]).worst
    assert gpu.aspect("fragmentation").text == "not measured: no allocator readings (no step was recorded on the GPU)"
    assert gpu.aspect("outside_cache").text == "not measured: no allocator readings (no step was recorded on the GPU)"
    assert gpu.aspect("kv_cache").status == "n/a"  # nothing recorded is not "ok"
    cpu = build_verdict([], [RunFacts("r", "m", device="cpu")]).worst
    assert cpu.aspect("fragmentation").text == "not measured: no allocator readings (CPU run)"
