"""Recorded unique KV bytes equal an independent count, step by step, for every cache layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from recorder_helpers import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    TF_VERSION,
    WINDOW,
    IndependentCounter,
    cache_layer_tensors,
    prompt_ids,
    tiny_model,
    unique_bytes,
)

import kvscope
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

FAMILIES = ["gpt_neox", "gemma2", "gemma3_text", "gpt_oss", "glm4_moe", "deepseek_v3", "llama"]


def record_and_count(model: torch.nn.Module, path: Path, **generate_kwargs: Any) -> tuple[Any, list[int]]:
    with kvscope.record(model, path) as rec:
        counter = IndependentCounter(model)
        try:
            out = model.generate(prompt_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, return_dict_in_generate=True, **generate_kwargs)
        finally:
            counter.remove()
        final_cache = out.past_key_values
        final_layers = cache_layer_tensors(final_cache)
        del out
        rec.settle()
    return final_layers, counter.per_step


def check_trace(path: Path, final_layers: list[list[torch.Tensor]], per_step: list[int]) -> dict[str, Any]:
    trace = open_trace(path)
    assert check_invariants(trace).ok
    steps = trace.read("steps").sort_by("step").to_pydict()
    layers = trace.read("layers").sort_by([("step", "ascending"), ("layer", "ascending")]).to_pylist()
    assert len(steps["step"]) == NEW_TOKENS == len(per_step)
    assert steps["kv_bytes"] == per_step
    assert steps["seq_len"] == [PROMPT_TOKENS + i for i in range(NEW_TOKENS)]
    assert all(v is None for v in steps["allocated_bytes"] + steps["nvml_used_bytes"])  # CPU: null, never 0
    last_step = [row for row in layers if row["step"] == NEW_TOKENS - 1]
    assert [row["kv_bytes"] for row in last_step] == [unique_bytes(ts) for ts in final_layers if ts]
    assert steps["kv_bytes"][-1] == unique_bytes([t for ts in final_layers for t in ts])
    generation = trace.read("generations").to_pylist()[0]
    assert generation["prompt_tokens"] == PROMPT_TOKENS and generation["new_tokens"] == NEW_TOKENS
    return {"steps": steps, "layers": layers, "generation": generation}


@pytest.mark.parametrize("family", FAMILIES)
def test_unique_bytes_match_an_independent_count(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    final_layers, per_step = record_and_count(model, tmp_path / "trace")
    seen = check_trace(tmp_path / "trace", final_layers, per_step)
    layers = seen["layers"]
    assert {row["layer"] for row in layers} == {0, 1}
    for row in layers:
        assert row["k_bytes"] > 0 and row["kv_bytes"] > 0 and row["stored_tokens"] > 0
    if family in ("gemma2", "gemma3_text", "gpt_oss"):
        sliding = [row for row in layers if row["layer_type"] == "sliding_attention"]
        assert sliding, "the tiny config declares sliding layers"
        assert all(row["stored_tokens"] <= WINDOW and row["k_shape"][-2] <= WINDOW for row in sliding)
        full = [row for row in layers if row["layer_type"] == "full_attention" and row["step"] == NEW_TOKENS - 1]
        assert all(row["stored_tokens"] == PROMPT_TOKENS + NEW_TOKENS - 1 for row in full)


def test_mla_latent_where_transformers_caches_latents(tmp_path: Path) -> None:
    model = tiny_model("deepseek_v3")
    final_layers, per_step = record_and_count(model, tmp_path / "trace")
    layers = check_trace(tmp_path / "trace", final_layers, per_step)["layers"]
    if TF_VERSION >= Version("5.15"):
        assert {row["layer_type"] for row in layers} == {"latent"}
        assert all(row["k_shape"][1] == 1 and row["k_shape"][-1] == 16 for row in layers)  # c_kv: kv_lora_rank
        assert all(row["v_shape"][-1] == 4 for row in layers)  # k_pe: qk_rope_head_dim
    else:  # decompressed per-head K (qk_nope + qk_rope) and V
        assert "latent" not in {row["layer_type"] for row in layers}
        assert all(row["k_shape"][1] == 4 and row["k_shape"][-1] == 12 for row in layers)


def test_static_cache_reports_capacity(tmp_path: Path) -> None:
    model = tiny_model("llama")
    final_layers, per_step = record_and_count(model, tmp_path / "trace", cache_implementation="static")
    seen = check_trace(tmp_path / "trace", final_layers, per_step)
    capacity = final_layers[0][0].shape[-2]  # generate sizes it from max_length
    assert capacity >= PROMPT_TOKENS + NEW_TOKENS - 1
    first = [row for row in seen["layers"] if row["step"] == 0]
    assert all(row["capacity_tokens"] == capacity and row["stored_tokens"] == PROMPT_TOKENS for row in first)
    # Preallocated: the bytes do not grow while tokens are written in place.
    assert len(set(seen["steps"]["kv_bytes"])) == 1
    assert "Static" in seen["generation"]["cache_class"]


def test_quantized_cache(tmp_path: Path) -> None:
    backend = None
    for module, name in (("optimum.quanto", "quanto"), ("hqq", "HQQ")):
        try:
            __import__(module)
            backend = name
            break
        except ImportError:
            continue
    if backend is None:
        pytest.skip("QuantizedCache needs optimum-quanto or hqq, and neither is installed here")
    model = tiny_model("llama")
    config = {"backend": backend, "nbits": 4, "residual_length": 4, "q_group_size": 16}
    final_layers, per_step = record_and_count(model, tmp_path / "trace", cache_implementation="quantized",
                                              cache_config=config)
    seen = check_trace(tmp_path / "trace", final_layers, per_step)
    assert "Quantized" in seen["generation"]["cache_class"]


def test_encoder_decoder_cache_records_self_attention(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("bart", vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with kvscope.record(model, tmp_path / "trace"):
        counter = IndependentCounter(model)
        try:
            out = model.generate(prompt_ids(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 num_beams=1, return_dict_in_generate=True)
        finally:
            counter.remove()
    trace = open_trace(tmp_path / "trace")
    steps = trace.read("steps").sort_by("step").to_pydict()
    assert steps["kv_bytes"] == counter.per_step and len(counter.per_step) >= 7
    last = [t for layer in cache_layer_tensors(out.past_key_values) for t in layer]
    assert steps["kv_bytes"][-1] == unique_bytes(last)
    assert steps["seq_len"][:2] == [1, 2]  # decoder tokens, not the encoder's prompt


def test_preallocated_sliding_layers_hold_at_most_the_window(tmp_path: Path) -> None:
    model = tiny_model("gemma2")
    # 4.4x: HybridCache; later releases: StaticCache with StaticSlidingWindowLayer for sliding layers.
    implementation = "hybrid" if TF_VERSION < Version("4.50") else "static"
    final_layers, per_step = record_and_count(model, tmp_path / "trace", cache_implementation=implementation)
    seen = check_trace(tmp_path / "trace", final_layers, per_step)
    sliding = [row for row in seen["layers"] if row["layer_type"] == "sliding_attention"]
    full = [row for row in seen["layers"] if row["layer_type"] == "full_attention"]
    assert sliding and full
    assert all(row["capacity_tokens"] == WINDOW and row["stored_tokens"] <= WINDOW for row in sliding)
    assert all(row["capacity_tokens"] >= PROMPT_TOKENS + NEW_TOKENS - 1 for row in full)
    assert max(row["stored_tokens"] for row in full) == PROMPT_TOKENS + NEW_TOKENS - 1
    assert len(set(seen["steps"]["kv_bytes"])) == 1  # preallocated: nothing grows


def test_sliding_window_cache_preallocates_the_window(tmp_path: Path) -> None:
    model = tiny_model("mistral")  # every layer sliding: SlidingWindowCache (4.4x), StaticCache later
    final_layers, per_step = record_and_count(model, tmp_path / "trace", cache_implementation="sliding_window")
    seen = check_trace(tmp_path / "trace", final_layers, per_step)
    assert {row["layer_type"] for row in seen["layers"]} == {"sliding_attention"}
    assert all(row["capacity_tokens"] == WINDOW and row["stored_tokens"] == min(WINDOW, PROMPT_TOKENS + row["step"])
               for row in seen["layers"])
