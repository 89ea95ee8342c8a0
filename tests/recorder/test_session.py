"""The recording session: generations, settle, prompts, OOM events, KV samples, options."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from recorder_helpers import NEW_TOKENS, PROMPT_TOKENS, cache_layer_tensors, output_cache, prompt_ids, tiny_model

import kvscope
from kvscope.errors import UsageError
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace


def _generate(model: torch.nn.Module, new_tokens: int = NEW_TOKENS, **kwargs: Any) -> Any:
    return model.generate(prompt_ids(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          **kwargs)


def test_several_generations_settle_and_prompts(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    with kvscope.record(model, tmp_path / "t", labels={"variant": "a"}, store_prompts=True) as rec:
        rec.next_prompt("first", text="hello")
        out = _generate(model, 6)
        del out
        settled = rec.settle()
        assert settled is not None and settled.gen_id == 0
        _generate(model, 4)
        rec.mark("between", note=1)
        assert rec.settle() is not None
    trace = open_trace(tmp_path / "t")
    assert check_invariants(trace).ok
    gens = trace.read("generations").sort_by("gen_id").to_pylist()
    assert [g["prompt_id"] for g in gens] == ["first", "gen-1"]
    assert [g["new_tokens"] for g in gens] == [6, 4]
    assert gens[0]["prompt_text"] == "hello"
    assert json.loads(gens[1]["prompt_text"]) == prompt_ids()[0].tolist()  # ids when no text is given
    assert all(g["baseline_allocated_bytes"] is None and g["post_release_nvml_used_bytes"] is None for g in gens)
    run = trace.read("run").to_pylist()[0]
    assert json.loads(run["labels"]) == {"variant": "a"}
    assert run["model_type"] == "gpt_neox" and run["num_layers"] == 2 and run["device"] == "cpu"
    options = json.loads(run["options"])
    assert options["flush_every"] == 64 and "compile" in options
    steps = trace.read("steps").to_pydict()
    assert sorted(set(steps["gen_id"])) == [0, 1]
    assert all(ns is not None and ns > 0 for ns in steps["recorder_ns"])
    events = trace.read("events").to_pylist()
    assert [e["kind"] for e in events] == ["marker"]
    assert "generate" not in vars(model)  # the wrapper is gone after the block


def test_prompts_are_not_stored_by_default(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    with kvscope.record(model, tmp_path / "t") as rec:
        rec.next_prompt("p", text="secret")
        _generate(model, 3)
    gens = open_trace(tmp_path / "t").read("generations").to_pylist()
    assert gens[0]["prompt_id"] == "p" and gens[0]["prompt_text"] is None


def test_oom_inside_generate_writes_an_event_flushes_and_reraises(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    calls = {"n": 0}
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def explode(module: torch.nn.Module, args: tuple, output: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise error

    handle = model.gpt_neox.layers[1].register_forward_hook(explode)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with kvscope.record(model, tmp_path / "t"):
            try:
                _generate(model)
            finally:
                # Already on disk before the `with` block ends.
                on_disk = open_trace(tmp_path / "t")
                assert on_disk.num_rows("steps") == 3
                assert [e["kind"] for e in on_disk.read("events").to_pylist()] == ["oom"]
    handle.remove()
    assert caught.value is error
    event = open_trace(tmp_path / "t").read("events").to_pylist()[0]
    detail = json.loads(event["detail"])
    assert event["gen_id"] == 0 and event["step"] == 3
    assert detail["exception"] == "OutOfMemoryError" and detail["last_step"]["step"] == 2
    assert detail["last_step"]["kv_bytes"] > 0 and "allocator" in detail["last_step"]


def test_kv_samples_are_exact_copies_within_the_budget(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    expected: dict[int, list[bytes]] = {}
    step = {"n": 0}

    def capture(module: torch.nn.Module, args: tuple, output: Any) -> None:
        if step["n"] % 4 == 0:
            layers = cache_layer_tensors(output_cache(output))
            expected[step["n"]] = [t.contiguous().numpy().tobytes() for t in layers[0][:2]]
        step["n"] += 1

    handle = model.register_forward_hook(capture)
    with kvscope.record(model, tmp_path / "t", sample_kv_every=4, sample_layers=[0]):
        _generate(model)
    handle.remove()
    samples = open_trace(tmp_path / "t").read("kv_samples").to_pylist()
    assert sorted({s["step"] for s in samples}) == sorted(expected)
    for sample in samples:
        assert sample["layer"] == 0 and sample["dtype"] == "float32"
        index = {"k": 0, "v": 1}[sample["tensor"]]
        assert sample["data"] == expected[sample["step"]][index]
        assert sample["shape"][-2] == PROMPT_TOKENS + sample["step"]


def test_sample_budget_stops_sampling_with_an_event(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    budget = 3000  # room for the prefill's K and V of both layers (4 x 640 bytes), not for step 4's
    with kvscope.record(model, tmp_path / "t", sample_kv_every=4, max_sample_bytes=budget):
        _generate(model)
    trace = open_trace(tmp_path / "t")
    samples = trace.read("kv_samples").to_pylist()
    assert sum(len(s["data"]) for s in samples) <= budget
    assert {s["step"] for s in samples} == {0}
    assert "samples_budget" in [e["kind"] for e in trace.read("events").to_pylist()]


def test_flush_every_is_capped_at_64(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        kvscope.record(tiny_model("gpt_neox"), tmp_path / "t", flush_every=65)


def test_flush_every_writes_parts_during_a_generation(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox")
    parts_seen = []

    def count_parts(module: torch.nn.Module, args: tuple, output: Any) -> None:
        parts_seen.append(len(list((tmp_path / "t" / "steps").glob("part-*.parquet"))))
        time.sleep(0.01)  # leave the writer thread time to finish a part between steps, even on a loaded host

    handle = model.register_forward_hook(count_parts)
    with kvscope.record(model, tmp_path / "t", flush_every=4) as rec:
        assert rec.wait_ready(60)  # the block did not wait for its writer; parts appear once it runs
        _generate(model)
    handle.remove()
    assert max(parts_seen) >= 2  # parts appeared while generate was still running
    assert open_trace(tmp_path / "t").num_rows("steps") == NEW_TOKENS
