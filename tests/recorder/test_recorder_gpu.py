"""On a CUDA device: allocator and NVML readings are present, samples round-trip (skipped without CUDA)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from recorder_helpers import NEW_TOKENS, IndependentCounter, prompt_ids, tiny_model

import kvscope
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_recording_has_allocator_readings_and_exact_samples(tmp_path: Path) -> None:
    model = tiny_model("gpt_neox").cuda()
    expected: dict[int, bytes] = {}

    def capture(module: torch.nn.Module, args: tuple, output: object) -> None:
        keys = output.past_key_values.layers[0].keys if hasattr(output.past_key_values, "layers") else None
        if keys is not None and len(expected) == 0:
            expected[0] = keys.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()

    handle = model.register_forward_hook(capture)
    with kvscope.record(model, tmp_path / "t", sample_kv_every=8, sample_layers=[0]) as rec:
        out = model.generate(prompt_ids().cuda(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
        del out
        rec.settle()
    handle.remove()
    trace = open_trace(tmp_path / "t")
    assert check_invariants(trace).ok
    steps = trace.read("steps").to_pydict()
    assert all(v is not None and v > 0 for v in steps["allocated_bytes"] + steps["reserved_bytes"])
    assert all(v is not None for v in steps["alloc_retries"] + steps["num_ooms"])
    if pytest.importorskip("pynvml"):  # NVML readings, taken on the sampler thread, land in every step
        assert all(v is not None and v > 0 for v in steps["nvml_used_bytes"] + steps["nvml_total_bytes"])
    generation = trace.read("generations").to_pylist()[0]
    for point in ("baseline", "peak", "post_return", "post_release", "post_empty_cache"):
        assert generation[f"{point}_allocated_bytes"] is not None
    assert generation["peak_nvml_used_bytes"] >= max(steps["nvml_used_bytes"])
    samples = {(s["step"], s["tensor"]): s for s in trace.read("kv_samples").to_pylist()}
    if expected:
        assert samples[(0, "k")]["data"] == expected[0]


def test_offloaded_dynamic_cache_bytes_and_samples(tmp_path: Path) -> None:
    """DynamicCache(offloading=True): layers move to the host and back on a side stream; the recorded
    bytes still match an independent count and the samples hold the values of their step."""
    transformers = pytest.importorskip("transformers")
    from transformers import DynamicCache

    if "offloading" not in inspect.signature(DynamicCache.__init__).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no DynamicCache(offloading=True)")
    model = tiny_model("llama").cuda()
    expected: dict[tuple[int, int], bytes] = {}
    steps_seen = [0]

    def capture(module: torch.nn.Module, args: tuple, output: object) -> None:
        step = steps_seen[0]
        steps_seen[0] += 1
        if step % 4:
            return
        torch.cuda.synchronize()
        for index, layer in enumerate(output.past_key_values.layers):
            expected[(step, index)] = layer.keys.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()

    cache = DynamicCache(config=model.config, offloading=True)
    with kvscope.record(model, tmp_path / "t", sample_kv_every=4) as rec:
        counter = IndependentCounter(model)
        handle = model.register_forward_hook(capture)
        out = model.generate(prompt_ids().cuda(), past_key_values=cache, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
        handle.remove()
        counter.remove()
        del out, cache
        rec.settle()
    trace = open_trace(tmp_path / "t")
    assert check_invariants(trace).ok
    steps = trace.read("steps").sort_by("step").to_pydict()
    assert steps["kv_bytes"] == counter.per_step
    layers = trace.read("layers").to_pylist()
    assert {row["layer"] for row in layers} == {0, 1}
    assert all(row["stored_tokens"] == row["k_shape"][-2] for row in layers)
    samples = {(s["step"], s["layer"]): s["data"] for s in trace.read("kv_samples").to_pylist() if s["tensor"] == "k"}
    assert samples.keys() == expected.keys()
    assert all(samples[key] == expected[key] for key in expected)
