"""growth_curve's allocator fit: memory outside the cache (allocated − kv_bytes) on the context length.

The traces follow real recording patterns (pythia-1.4b geometry: 24 layers, 16 heads × 128, bf16,
every tensor rounded to the caching allocator's 512-byte blocks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from analyzer_helpers import MIB, detect, layer_rows, merge, run_row, step_rows, write_part

GIB = 1 << 30
LAYERS, HEADS, HEAD_DIM, ELEM = 24, 16, 128, 2
KV_PER_TOKEN_LAYER = 2 * HEADS * HEAD_DIM * ELEM  # 8 KiB
WEIGHTS = int(2.6 * GIB)


def _blocks(n: np.ndarray | int) -> np.ndarray:
    return ((np.asarray(n) + 511) // 512) * 512


def _trace(tmp_path: Path, seq: np.ndarray, kv: np.ndarray, outside: np.ndarray, *, total: int = 140 * GIB,
           layer_kv: dict[int, tuple[list[int], list[int], str]] | None = None) -> Path:
    write_part(tmp_path, "run", run_row(layer_types=["full_attention"] * LAYERS))
    allocated = (WEIGHTS + kv + outside).astype(int).tolist()
    write_part(tmp_path, "steps", step_rows("r1", 0, seq.tolist(), kv.astype(int).tolist(), allocated=allocated,
                                            reserved=[a + 20 * MIB for a in allocated], nvml_total=total))
    steps = list(range(len(seq)))
    per_layer = layer_kv or {i: ((kv // LAYERS).astype(int).tolist(), seq.tolist(), "full_attention")
                             for i in range(LAYERS)}
    write_part(tmp_path, "layers", merge(*(layer_rows("r1", 0, steps, i, b, st, lt)
                                           for i, (b, st, lt) in per_layer.items())))
    return tmp_path


def _outside(findings: list) -> list:
    return [f for f in findings if f.metric == "outside_marginal_rate_ratio"]


def test_kept_attention_weights_grow_quadratically_outside_a_linear_cache(tmp_path: Path) -> None:
    # generate(output_attentions=True, return_dict_in_generate=True): each decode step keeps one
    # [1, 16, 1, s] bf16 tensor per layer, the prefill a [1, 16, 64, 64] one per layer
    prompt, new = 64, 384
    seq = np.arange(prompt, prompt + new + 1)
    kv = seq * KV_PER_TOKEN_LAYER * LAYERS
    per_step = LAYERS * _blocks(HEADS * seq * ELEM)
    per_step[0] = LAYERS * _blocks(HEADS * prompt * prompt * ELEM)
    outside = np.cumsum(per_step) + 2 * MIB  # + the step's logits
    findings = detect(_trace(tmp_path, seq, kv, outside), "growth_curve")
    assert [(f.severity, f.gen_id, f.layer) for f in findings] == [("critical", 0, None)]
    (f,) = _outside(findings)
    # first-quarter decode tokens 65..160, last 353..448: each step adds 24 x ceil(s / 16) blocks of
    # 512 bytes, 7.53 blocks per layer on average at first and 25.5 at the end: x3.39
    assert f.value == pytest.approx(3.39, abs=0.01)
    assert f.threshold == 1.25
    assert f.evidence["outside_grown_bytes"] == pytest.approx(float(outside[-1] - outside[1]))
    assert f.evidence["outside_grown_bytes"] == pytest.approx(74.19 * MIB, abs=0.01 * MIB)
    assert f.evidence["cache_verdict"] == "linear"
    assert f.evidence["r2_quadratic"] == pytest.approx(1.0, abs=1e-4)
    assert f.message.startswith("the cache grows linearly (192.00 KiB per token); something outside it grows "
                                "quadratically (x3.4 marginal rate")
    # the cache's own fits (per layer, step totals) see nothing: only the allocator fit does
    assert detect(tmp_path, "growth_curve", check_outside=False) == []


def test_a_logits_processor_keeping_four_layers_keys_each_step(tmp_path: Path) -> None:
    # the case: 1.6 GB more allocated over 384 tokens while the cache grows linearly
    prompt, new = 64, 384
    seq = np.arange(prompt, prompt + new + 1)
    kv = seq * KV_PER_TOKEN_LAYER * LAYERS
    keys_per_layer = _blocks(HEADS * HEAD_DIM * ELEM * seq)  # one layer's K: [1, 16, s, 128]
    kept = np.concatenate([[0], np.cumsum(4 * keys_per_layer[1:])])
    findings = _outside(detect(_trace(tmp_path, seq, kv, kept + 2 * MIB), "growth_curve"))
    assert [(f.severity, f.metric) for f in findings] == [("critical", "outside_marginal_rate_ratio")]
    grown = findings[0].evidence["outside_grown_bytes"]
    assert grown == pytest.approx(1.6e9, rel=0.02)
    assert "+1.50 GiB over 383 tokens" in findings[0].message


def test_healthy_allocator_noise_and_a_one_off_workspace_are_not_growth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seq = np.arange(64, 449)
    kv = seq * KV_PER_TOKEN_LAYER * LAYERS
    # input ids and mask grow 16 bytes a step (512-byte blocks), random 0-2 blocks of temporaries,
    # and cuBLAS's 32 MiB workspace allocated on the 300th step
    outside = _blocks(16 * seq) + 512 * rng.integers(0, 3, seq.size) + 2 * MIB
    outside[300:] += 32 * MIB
    assert _outside(detect(_trace(tmp_path, seq, kv, outside), "growth_curve")) == []
    # the rising-steps rule is what keeps the workspace out: without it the step looks convex
    flagged = _outside(detect(tmp_path, "growth_curve", min_rising_fraction=0.0))
    assert [f.metric for f in flagged] == ["outside_marginal_rate_ratio"]


def test_small_smooth_growth_stays_under_the_floor(tmp_path: Path) -> None:
    seq = np.arange(64, 449)
    kv = seq * KV_PER_TOKEN_LAYER * LAYERS  # 84 MiB at the end: the cache floor is 8.4 MiB
    outside = 2 * MIB + 512 * ((seq - 64) ** 2 // 64)  # convex, rises every few steps, +1.1 MiB
    assert _outside(detect(_trace(tmp_path, seq, kv, outside), "growth_curve")) == []
    (f,) = _outside(detect(tmp_path, "growth_curve", min_outside_bytes=0, min_outside_cache_fraction=0.001,
                           min_rising_fraction=0.1))
    assert f.evidence["floor_bytes"] == pytest.approx(0.001 * kv[-1])
    assert f.evidence["outside_grown_bytes"] < 1.2 * MIB


def test_a_sliding_window_cache_and_a_static_cache_are_never_flagged(tmp_path: Path) -> None:
    # gpt-oss geometry: 12 sliding layers saturating at 127 tokens, 12 full layers growing; the
    # prefill's pinned prompt storage (step 0) falls away at step 1
    seq = np.arange(600, 1113)
    per_token = 2 * 8 * 64 * ELEM
    sliding = np.minimum(seq, 127)
    layer_kv = {i: ((per_token * (sliding if i % 2 == 0 else seq)).astype(int).tolist(),
                    (sliding if i % 2 == 0 else seq).tolist(),
                    "sliding_attention" if i % 2 == 0 else "full_attention") for i in range(LAYERS)}
    kv = per_token * (12 * sliding + 12 * seq)
    outside = np.full(seq.size, 3 * MIB) + _blocks(16 * seq)
    outside[0] += 12 * per_token * (600 - 127)
    dyn = _trace(tmp_path / "sliding", seq, kv, outside, layer_kv=layer_kv)
    assert [f.severity for f in detect(dyn, "growth_curve")] == []
    # a static cache: 1 GiB preallocated, flat; outside it only noise
    static_kv = np.full(seq.size, GIB)
    static = _trace(tmp_path / "static", seq, static_kv, 2 * MIB + _blocks(16 * seq),
                    layer_kv={i: ([GIB // LAYERS] * seq.size, [4096] * seq.size, "full_attention")
                              for i in range(LAYERS)})
    assert detect(static, "growth_curve") == []


def test_a_flat_static_cache_names_itself_when_something_else_grows(tmp_path: Path) -> None:
    seq = np.arange(64, 449)
    static_kv = np.full(seq.size, 512 * MIB)
    kept = np.concatenate([[0], np.cumsum(_blocks(HEADS * HEAD_DIM * ELEM * seq[1:]))])
    (f,) = detect(_trace(tmp_path, seq, static_kv, kept + 2 * MIB,
                         layer_kv={i: ([512 * MIB // LAYERS] * seq.size, [4096] * seq.size, "full_attention")
                                   for i in range(LAYERS)}), "growth_curve")
    assert f.metric == "outside_marginal_rate_ratio" and f.severity == "critical"
    assert f.message.startswith("the cache stays flat at 512.00 MiB (preallocated or full); something outside it")
    assert f.evidence["cache_verdict"] == "flat"


def test_without_allocator_readings_nothing_is_fitted(tmp_path: Path) -> None:
    seq = list(range(64, 200))
    write_part(tmp_path, "run", run_row())
    write_part(tmp_path, "steps", step_rows("r1", 0, seq, [1024 * s for s in seq]))
    assert detect(tmp_path, "growth_curve") == []


def test_a_sliding_layers_pinned_prefill_is_not_read_as_curvature(tmp_path: Path) -> None:
    # the H200 recording of the gpt-oss-20b twin, a 200-token prompt: at step 0 each of the 12
    # sliding layers is a view of the 200-token prefill (storage 200 tokens, not 127), so the step
    # total drops 1.45 MiB from step 0 to step 1, then grows 24 KiB per token (the 12 full layers)
    seq = np.arange(200, 328)
    per_token = 2 * 8 * 64 * ELEM
    sliding = np.full(seq.size, 127)
    kv = per_token * (12 * sliding + 12 * seq)
    kv[0] += 12 * per_token * (200 - 127)
    layer_kv = {i: ((per_token * (sliding if i % 2 == 0 else seq)).astype(int).tolist(),
                    (sliding if i % 2 == 0 else seq).tolist(),
                    "sliding_attention" if i % 2 == 0 else "full_attention") for i in range(LAYERS)}
    trace = _trace(tmp_path, seq, kv, np.full(seq.size, 3 * MIB), layer_kv=layer_kv)
    assert [f for f in detect(trace, "growth_curve") if f.severity != "info"] == []


def test_copies_kept_each_step_of_a_long_prompt_grow_linearly_far_faster_than_the_cache(tmp_path: Path) -> None:
    # H200, gemma-3-4b twin, 1,000-token prompt: a logits processor keeping four full layers' keys
    # each step; the context grows 6% over the generation, so the copies grow linearly (8 MiB a step)
    # while the cache, its sliding layers full, grows 20 KiB a token: 400x
    prompt, new = 1000, 64
    seq = np.arange(prompt, prompt + new)
    kv = 137 * MIB + (seq - prompt) * 20 * 1024
    outside = 40 * MIB + np.cumsum(_blocks(4 * seq * 2048))
    (f,) = detect(_trace(tmp_path, seq, kv, outside), "growth_curve")
    assert (f.severity, f.metric, f.threshold) == ("warning", "outside_linear_rate_ratio", 20.0)
    assert f.value == pytest.approx(8 * 1024 * 1024 / (20 * 1024), rel=0.05)
    assert f.message.startswith("the cache grows linearly (20.00 KiB per token); something outside it grows "
                                "linearly, 8.")
    # a requested per-step output (scores and logits, 250 KiB a token) next to a cache of 24 KiB a
    # token (gpt-oss-20b twin, 48-token prompt): 10x, not flagged
    seq = np.arange(48, 48 + 96)
    kv = seq * 24 * 1024
    scores = 2 * MIB + (seq - 48) * 250 * 1024
    assert detect(_trace(tmp_path / "scores", seq, kv, scores), "growth_curve") == []
