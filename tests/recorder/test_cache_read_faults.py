"""A cache the recorder cannot read never breaks a generation: an `error` event, that step's rows
skipped, the generated ids unchanged and the trace valid."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from recorder_helpers import TF_VERSION, prompt_ids, tiny_model

import kvscope
from kvscope.recorder import cache_walk
from kvscope.recorder import step_hook as steps
from kvscope.trace.inspect import inspect_trace
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

NEW = 6
FAILING = {2, 3}


def _generate(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def _check_failed_steps(path: Path, failing: set[int]) -> None:
    trace = open_trace(path)
    assert check_invariants(trace).ok
    assert inspect_trace(path)["valid"]
    recorded = trace.read("steps").sort_by("step").to_pydict()["step"]
    assert recorded == [s for s in range(NEW) if s not in failing]
    layer_steps = set(trace.read("layers").to_pydict()["step"])
    assert layer_steps == set(recorded)
    events = [e for e in trace.read("events").to_pylist() if e["kind"] == "error"]
    assert len(events) == 1  # one event per generation, however many steps failed
    detail = json.loads(events[0]["detail"])
    assert detail["source"] == "cache_walk" and detail["exception"] == "RuntimeError"
    assert (detail["first_step"], detail["last_step"], detail["failed_steps"]) == (min(failing), max(failing),
                                                                                   len(failing))
    assert events[0]["step"] == min(failing)
    generation = trace.read("generations").to_pylist()[0]
    assert generation["new_tokens"] == NEW


@pytest.mark.parametrize("native", [False, True])
def test_a_failing_cache_read_leaves_generation_unchanged(native: bool, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    expected = _generate(model)
    real = steps.measure_cache
    calls: list[int] = []

    def flaky(cache: Any, layout: Any, seq_len: int, *args: Any) -> Any:
        calls.append(seq_len)
        if len(calls) - 1 in FAILING:
            raise RuntimeError("injected: a storage without a data pointer")
        return real(cache, layout, seq_len, *args)

    monkeypatch.setattr(steps, "measure_cache", flaky)
    try:
        native_mode: Any = True if native else False
        with kvscope.record(model, tmp_path / "trace", native=native_mode):
            with pytest.warns(RuntimeWarning, match="could not read the cache at step 2"):
                out = _generate(model)
    except Exception as exc:  # the native build may be unavailable here
        if native and "native" in str(exc).lower():
            pytest.skip(f"native fast path unavailable: {exc}")
        raise
    assert torch.equal(out, expected)
    assert len(calls) == NEW
    _check_failed_steps(tmp_path / "trace", FAILING)


def test_a_failing_walk_inside_an_encoder_decoder_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The general walk (not the fast path) raising mid-iteration: a layer row already built is
    dropped with its step."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("bart", vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    expected = _generate(model)
    real = cache_walk.iter_layers
    step_of_call: list[int] = []

    def broken_after_first_layer(cache: Any) -> Any:
        step_of_call.append(0)
        for i, entry in enumerate(real(cache)):
            if len(step_of_call) == 2 and i == 1:
                raise RuntimeError("injected: a tensor subclass without storage")
            yield entry

    from kvscope.recorder import measure

    monkeypatch.setattr(measure, "iter_layers", broken_after_first_layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with kvscope.record(model, tmp_path / "trace"):
            out = _generate(model)
    assert torch.equal(out, expected)
    # bart's decoder start token is the first step: `NEW` steps cover the generated tokens
    trace = open_trace(tmp_path / "trace")
    recorded = trace.read("steps").sort_by("step").to_pydict()["step"]
    assert 1 not in recorded and 0 in recorded and 2 in recorded
    layers = trace.read("layers").to_pydict()
    assert 1 not in set(layers["step"])
    assert check_invariants(trace).ok
    events = [json.loads(e["detail"]) for e in trace.read("events").to_pylist() if e["kind"] == "error"]
    assert [e["source"] for e in events] == ["cache_walk"] and events[0]["first_step"] == 1


class _RaisingCapture:
    """The native module with a capture that raises (a C++ failure on some unusual cache)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.raised = 0

    def capture(self, *args: Any) -> Any:
        self.raised += 1
        raise RuntimeError("injected: the native capture failed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_failing_native_capture_falls_back_to_python(tmp_path: Path) -> None:
    from recorder_helpers import assert_same_recording

    model = tiny_model("gpt_neox")
    expected = _generate(model)
    try:
        with kvscope.record(model, tmp_path / "native", native=True) as rec:
            capture = rec.steps.native = _RaisingCapture(rec.steps.native)
            out = _generate(model)
            rec.settle()
    except Exception as exc:  # noqa: BLE001 - no compiler for the native fast path here
        pytest.skip(f"native fast path unavailable: {exc}")
    assert torch.equal(out, expected)
    if not capture.raised and TF_VERSION.major < 5 and TF_VERSION.minor < 54:
        pytest.skip("legacy tuple caches are walked in Python (transformers < 4.54)")
    assert capture.raised >= 1  # the native capture raised: the step was read in Python
    with kvscope.record(model, tmp_path / "python", native=False) as rec:
        _generate(model)
        rec.settle()
    layers = assert_same_recording(tmp_path / "native", tmp_path / "python")
    assert len({row["step"] for row in layers}) == NEW
    assert not [e for e in open_trace(tmp_path / "native").read("events").to_pylist() if e["kind"] == "error"]
