"""A generation whose cache the recorder cannot see says so: a warning while recording, a `no_cache`
event, `cache_seen: false` in the run's options, and "no cache seen" from inspect and analyze."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from recorder_helpers import prompt_ids, tiny_model

import kvscope
from kvscope.trace.inspect import inspect_trace
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

NEW = 5


def _options(path: Path) -> dict:
    return json.loads(open_trace(path).read("run").to_pylist()[0]["options"])


def test_no_cache_seen_is_said_everywhere(tmp_path: Path) -> None:
    model = tiny_model("llama")
    expected = model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=False)
    path = tmp_path / "trace"
    with kvscope.record(model, path, writer="thread", nvml=False) as rec:
        with pytest.warns(RuntimeWarning, match="no cache seen in generation 0"):
            out = model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 use_cache=False)
        assert torch.equal(out, expected)
        rec.settle()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)  # cached: seen
        rec.settle()
    trace = open_trace(path)
    assert check_invariants(trace).ok
    layers = trace.read("layers").to_pydict()
    assert set(layers["gen_id"]) == {1}
    events = [e for e in trace.read("events").to_pylist() if e["kind"] == "no_cache"]
    assert [(e["gen_id"], json.loads(e["detail"])["steps"]) for e in events] == [(0, NEW)]
    options = _options(path)
    assert options["cache_seen"] is False and options["cache_not_seen_generations"] == [0]
    report = inspect_trace(path)
    assert report["valid"]
    assert [w for w in report["warnings"] if "no cache seen (generations [0])" in w]
    pytest.importorskip("duckdb")
    findings = [f for f in kvscope.analyze([path]).findings if f.detector == "cache_seen"]
    assert [(f.severity, f.gen_id) for f in findings] == [("warning", 0)]
    assert "no cache seen in generation 0 (llama)" in findings[0].message


def test_a_seen_cache_sets_no_flag(tmp_path: Path) -> None:
    model = tiny_model("llama")
    path = tmp_path / "trace"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with kvscope.record(model, path, writer="thread", nvml=False):
            model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert "cache_seen" not in _options(path)
    assert not [w for w in inspect_trace(path)["warnings"] if "no cache seen" in w]
    pytest.importorskip("duckdb")
    assert not [f for f in kvscope.analyze([path]).findings if f.detector == "cache_seen"]


def test_unreadable_steps_are_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvscope.recorder import step_hook as steps

    model = tiny_model("llama")
    real = steps.measure_cache
    calls: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(0)
        if len(calls) in (3, 4):
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "measure_cache", flaky)
    path = tmp_path / "trace"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with kvscope.record(model, path, writer="thread", nvml=False, native=False):
            model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert "cache_seen" not in _options(path)  # seen, only not read at two steps
    pytest.importorskip("duckdb")
    (finding,) = [f for f in kvscope.analyze([path]).findings if f.detector == "cache_seen"]
    assert finding.metric == "unreadable_cache_steps" and finding.value == 2
    assert finding.evidence["first_step"] == 2 and finding.evidence["last_step"] == 3
