"""The recorder over many architectures (tiny random configs): generated ids unchanged, and per
step the bytes of every layer and in all equal an independent count of what the model's cache (or
state) holds. Runs with whatever transformers is installed: the newest in the main environment,
and the subset an older release has in `make compat` (a model type it lacks, or cannot generate
with even without kvscope, is skipped with the reason)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from model_zoo import ENCODER_DECODERS, tiny_case
from packaging.version import Version
from recorder_helpers import StateCounter

import kvscope
from kvscope.schema.layer_types import CONSTANT_IN_TOKENS
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

NEW = 6
GENERATIONS = 2
TF = Version(transformers.__version__)

ATTENTION = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt_oss", "glm4_moe", "deepseek_v3",
    "deepseek_v2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "phi", "phi3",
    "starcoder2", "olmo", "olmo2", "cohere", "cohere2", "stablelm", "granite", "helium", "smollm3", "glm", "glm4",
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "codegen", "gpt_bigcode", "bloom", "falcon", "opt", "biogpt", "xglm",
    "persimmon", "mpt", "exaone4", "ernie4_5", "hunyuan_v1_dense", "arcee", "seed_oss", "jetmoe", "apertus",
]
# state-space, recurrent and hybrid: (model type, the layer types its state layers must have)
STATEFUL = {
    "mamba": {"ssm"}, "falcon_mamba": {"ssm"}, "mamba2": {"ssm"}, "rwkv": {"recurrent"},
    "jamba": {"ssm"}, "bamba": {"ssm"}, "granitemoehybrid": {"ssm"}, "zamba2": {"ssm"}, "falcon_h1": set(),
    "lfm2": {"conv"}, "qwen3_next": {"recurrent"}, "recurrent_gemma": {"recurrent"}, "xlstm": {"recurrent"},
}
MODULE_STATE = {"recurrent_gemma"}


def _record(model_type: str, path: Path) -> tuple[list, StateCounter]:
    case = tiny_case(model_type)
    model = case.model

    def generate() -> torch.Tensor:
        return model.generate(**case.inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)

    try:
        expected = generate()
    except Exception as exc:  # noqa: BLE001 - transformers itself cannot run this tiny config
        pytest.skip(f"transformers {transformers.__version__} cannot generate with tiny {model_type}: "
                    f"{type(exc).__name__}: {str(exc)[:120]}")
    counter = StateCounter(model, modules=model_type in MODULE_STATE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "no cache seen", no failed read
        try:
            with kvscope.record(model, path, writer="thread", nvml=False) as rec:
                for _ in range(GENERATIONS):
                    out = generate()
                    assert torch.equal(out, expected), "recording changed the generated ids"
                    del out
                    rec.settle()
        finally:
            counter.remove()
    return counter.per_step, counter


def _check(model_type: str, path: Path, per_step: list) -> list[dict]:
    trace = open_trace(path)
    assert check_invariants(trace).ok
    steps = trace.read("steps").sort_by([("gen_id", "ascending"), ("step", "ascending")]).to_pylist()
    layers = trace.read("layers").to_pylist()
    assert len(steps) == len(per_step) and {s["gen_id"] for s in steps} == set(range(GENERATIONS))
    by_step: dict[tuple[int, int], dict[int, int]] = {}
    for row in layers:
        by_step.setdefault((row["gen_id"], row["step"]), {})[row["layer"]] = row["kv_bytes"]
    for step, (per_layer, total) in zip(steps, per_step, strict=True):
        key = (step["gen_id"], step["step"])
        assert by_step.get(key, {}) == per_layer, f"layer bytes at {key}"
        assert step["kv_bytes"] == total, f"total bytes at {key}"
    assert all(total > 0 for _, total in per_step), "the independent count found nothing to compare"
    generations = trace.read("generations").to_pylist()
    assert [g["new_tokens"] for g in generations] == [NEW] * GENERATIONS
    return layers


@pytest.mark.parametrize("model_type", ATTENTION)
def test_attention_models(model_type: str, tmp_path: Path) -> None:
    per_step, _ = _record(model_type, tmp_path / "trace")
    layers = _check(model_type, tmp_path / "trace", per_step)
    assert not {r["layer_type"] for r in layers} & CONSTANT_IN_TOKENS
    if model_type == "gpt_neo":  # global, local: the local layer is a sliding window
        assert {(r["layer"], r["layer_type"]) for r in layers} == {(0, "full_attention"), (1, "sliding_attention")}


@pytest.mark.parametrize("model_type", ENCODER_DECODERS)
def test_encoder_decoders_record_cross_attention(model_type: str, tmp_path: Path) -> None:
    per_step, _ = _record(model_type, tmp_path / "trace")
    layers = _check(model_type, tmp_path / "trace", per_step)
    cross = [r for r in layers if r["layer_type"] == "cross_attention"]
    assert {r["layer"] for r in cross} == {2, 3}  # numbered after the 2 self-attention layers
    assert {r["layer"] for r in layers if r["layer_type"] != "cross_attention"} == {0, 1}
    encoder_len = {r["stored_tokens"] for r in cross}
    assert len(encoder_len) == 1  # fixed by the encoder's length, whatever the step
    assert len({r["kv_bytes"] for r in cross}) == 1


@pytest.mark.parametrize("model_type", sorted(STATEFUL))
def test_state_space_recurrent_and_hybrid_models(model_type: str, tmp_path: Path) -> None:
    per_step, _ = _record(model_type, tmp_path / "trace")
    layers = _check(model_type, tmp_path / "trace", per_step)
    state_types = {r["layer_type"] for r in layers} & CONSTANT_IN_TOKENS
    assert state_types == STATEFUL[model_type]
    for kind in state_types:  # constant in tokens: the same bytes at every decode step of a layer
        per_layer: dict[int, set[int]] = {}
        for row in layers:
            if row["layer_type"] == kind and row["step"] > 0:
                per_layer.setdefault(row["layer"], set()).add(row["kv_bytes"])
        assert per_layer and all(len(sizes) == 1 for sizes in per_layer.values())
