"""layer_anomaly, layer_uniformity and cache_density: hand-written traces and geometry numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from analyzer_helpers import detect, layer_rows, merge, run_row, step_rows, write_part

MIB = 1 << 20


def _last_step_trace(tmp_path: Path, per_layer: list[tuple[str, int, int, str]], config: dict | None = None,
                     model_type: str = "llama", dtype: str = "bfloat16") -> Path:
    """One generation of two steps; per layer (type, kv bytes per token, tokens at the end, k_dtype)."""
    write_part(tmp_path, "run", run_row(config=config, layer_types=[p[0] for p in per_layer],
                                        model_type=model_type, dtype=dtype))
    rows = [layer_rows("r1", 0, [0, 1], i, [bpt * (tokens - 1), bpt * tokens], [tokens - 1, tokens], kind, kdt)
            for i, (kind, bpt, tokens, kdt) in enumerate(per_layer)]
    write_part(tmp_path, "layers", merge(*rows))
    last = max(p[2] for p in per_layer)
    write_part(tmp_path, "steps", step_rows("r1", 0, [last - 1, last], [0, 0]))
    return tmp_path


def test_layer_anomaly_flags_the_one_odd_layer_of_four(tmp_path: Path) -> None:
    trace = _last_step_trace(tmp_path, [("full_attention", 2048, 100, "bfloat16")] * 3
                             + [("full_attention", 4096, 100, "float32")])
    (f,) = detect(trace, "layer_anomaly")
    assert (f.severity, f.gen_id, f.layer, f.metric, f.value, f.threshold) == (
        "warning", 0, 3, "robust_z", 100.0, 3.0)
    assert f.evidence["ratio_to_median"] == 2.0
    assert "float32" in f.message


def test_layer_anomaly_compares_only_layers_of_the_same_type(tmp_path: Path) -> None:
    layers = [("sliding_attention", 2048, 100, "bfloat16"), ("full_attention", 2048, 4000, "bfloat16")] * 3
    layers[4] = ("sliding_attention", 2048 * 3, 100, "bfloat16")
    assert [f.layer for f in detect(_last_step_trace(tmp_path, layers), "layer_anomaly")] == [4]


def test_layer_anomaly_robust_z_with_spread_peers(tmp_path: Path) -> None:
    bpts = [1000, 1010, 990, 1005, 995, 1100]
    trace = _last_step_trace(tmp_path, [("full_attention", b, 100, "bfloat16") for b in bpts])
    (f,) = detect(trace, "layer_anomaly")
    # median 1002.5, MAD 7.5: z = 97.5 / (1.4826 * 7.5)
    assert f.layer == 5 and f.value == pytest.approx(97.5 / (1.4826 * 7.5))


def _gpt_oss(synth) -> Path:  # noqa: ANN001
    return synth(num_layers=36, layer_types=("sliding_attention", "full_attention") * 18, sliding_window=128,
                 num_kv_heads=8, head_dim=64, dtype="bfloat16", prompt_tokens=64, steps=4033, model_type="gpt_oss")


def test_gpt_oss_geometry_cv_and_modes(synth) -> None:  # noqa: ANN001
    (f,) = detect(_gpt_oss(synth), "layer_uniformity")
    assert (f.severity, f.metric) == ("info", "cv")
    assert f.value == pytest.approx(0.94, abs=0.005)
    modes = f.evidence["modes"]
    assert [m["count"] for m in modes] == [18, 18]
    assert modes[0]["bytes"] / MIB == pytest.approx(0.25, abs=0.01)
    assert modes[1]["bytes"] / MIB == pytest.approx(8.0)
    assert modes[0]["types"] == ["sliding_attention"] and modes[1]["types"] == ["full_attention"]
    assert f.evidence["mode_ratio"] == "1:1"


def test_gemma3_pattern_is_five_to_one(synth) -> None:  # noqa: ANN001
    kinds = tuple((["sliding_attention"] * 5 + ["full_attention"]) * 2)
    (f,) = detect(synth(num_layers=12, layer_types=kinds, sliding_window=64, steps=300), "layer_uniformity")
    assert f.evidence["mode_ratio"] == "5:1"


def test_undeclared_sliding_layers_are_a_warning(synth) -> None:  # noqa: ANN001
    trace = synth(num_layers=4, layer_types=("sliding_attention", "full_attention") * 2, sliding_window=32,
                  undeclared_sliding=True)
    findings = detect(trace, "layer_uniformity")
    assert [(f.severity, f.metric, f.value, f.layer) for f in findings] == [
        ("warning", "unsaturated_sliding_layers", 2.0, None), ("info", "cv", 0.0, None)]
    assert findings[0].evidence["unsaturated_layers"] == [0, 2]


def test_pythia_geometry_fp16_is_8192_bytes_per_token_per_layer(synth) -> None:  # noqa: ANN001
    trace = synth(num_layers=24, num_kv_heads=16, head_dim=128, dtype="float16", model_type="gpt_neox")
    (f,) = detect(trace, "cache_density")
    assert (f.severity, f.metric, f.value, f.threshold) == ("info", "bytes_per_token_per_layer", 8192.0, 8192.0)
    assert f.evidence["ratio"] == 1.0


def test_cache_density_reads_gpt_neox_config_keys(tmp_path: Path) -> None:
    # gpt_neox: no num_key_value_heads, no head_dim: 16 heads of 2048 / 16 = 128; dtype from the config
    config = {"model_type": "gpt_neox", "num_attention_heads": 16, "hidden_size": 2048, "torch_dtype": "float16"}
    trace = _last_step_trace(tmp_path, [("full_attention", 8192, 50, "float16")] * 4, config, "gpt_neox")
    (f,) = detect(trace, "cache_density")
    assert (f.severity, f.value, f.threshold) == ("info", 8192.0, 8192.0)


def test_cache_density_uses_k_dtype_when_the_config_has_none(tmp_path: Path) -> None:
    config = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
    trace = _last_step_trace(tmp_path, [("full_attention", 2 * 8 * 128 * 4, 50, "float32")] * 4, config)
    (f,) = detect(trace, "cache_density")
    assert (f.severity, f.value, f.threshold) == ("info", 8192.0, 8192.0)
    assert f.evidence["dtype_from_trace"] is True


def test_cache_density_flags_a_wider_dtype_but_not_one_odd_layer(tmp_path: Path) -> None:
    config = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "torch_dtype": "bfloat16"}
    odd = [("full_attention", 4096, 50, "bfloat16")] * 3 + [("full_attention", 8192, 50, "float32")]
    assert [f.severity for f in detect(_last_step_trace(tmp_path / "odd", odd, config), "cache_density")] == ["info"]
    wide = [("full_attention", 8192, 50, "float32")] * 4
    (f,) = detect(_last_step_trace(tmp_path / "wide", wide, config), "cache_density")
    assert (f.severity, f.value, f.threshold, f.evidence["ratio"]) == ("warning", 8192.0, 4096.0, 2.0)
    assert "2.00x" in f.message


def test_cache_density_latent_geometry(synth, tmp_path: Path) -> None:  # noqa: ANN001
    trace = synth(num_layers=4, layer_types=("latent",) * 4, kv_lora_rank=512, qk_rope_head_dim=64)
    (f,) = detect(trace, "cache_density")
    assert (f.severity, f.value, f.threshold) == ("info", 1152.0, 1152.0)
    # a decompressed MLA cache (per-head K and V) is far above the latent's expectation
    config = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 192, "torch_dtype": "bfloat16"}
    dense = _last_step_trace(tmp_path, [("full_attention", 2 * 16 * 192 * 2, 30, "bfloat16")] * 4, config,
                             "deepseek_v3")
    (g,) = detect(dense, "cache_density")
    assert g.severity == "warning" and g.evidence["ratio"] == pytest.approx(12288 / 1152)
    assert json.dumps(g.to_dict())


@pytest.mark.parametrize("style", ["per_layer_config", "global_head_dim"])
def test_cache_density_gives_gemma4_full_layers_their_own_geometry(tmp_path: Path, style: str) -> None:
    # Gemma 4 31B: sliding layers 16 kv heads x 256, full layers 4 kv heads x 512 (bf16: 16 KiB and
    # 8 KiB per token). transformers 5.17 writes the full layers as per_layer_config overrides, the
    # published config as global_head_dim / num_global_key_value_heads.
    types = ["sliding_attention"] * 5 + ["full_attention"]
    config = {"num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 256, "torch_dtype": "bfloat16"}
    if style == "per_layer_config":
        config["per_layer_config"] = {"05": {"head_dim": 512, "num_key_value_heads": 4}, "bad": {}, "7": "x"}
    else:
        config.update(global_head_dim=512, num_global_key_value_heads=4)
    # the full layer measured at 8 KiB: as its geometry says, so the per-type lines read 1.00
    layers = [(kind, 16384 if kind == "sliding_attention" else 8192, 80, "bfloat16") for kind in types]
    (f,) = detect(_last_step_trace(tmp_path, layers, config, "gemma4_text"), "cache_density")
    assert (f.severity, f.value, f.threshold, f.evidence["ratio"]) == ("info", 16384.0, 16384.0, 1.0)
    by_type = {r["layer_type"]: (r["layers"], r["measured"], r["expected"]) for r in f.evidence["by_layer_type"]}
    assert by_type == {"full_attention": (1, 8192.0, 8192.0), "sliding_attention": (5, 16384.0, 16384.0)}
    assert "1 full_attention 8.00 KiB (geometry 8.00 KiB)" in f.message
    # a full layer stored at the sliding layers' size is now visible per type
    wrong = [(kind, 16384, 80, "bfloat16") for kind in types]
    (g,) = detect(_last_step_trace(tmp_path / "wrong", wrong, config, "gemma4_text"), "cache_density")
    assert {r["layer_type"]: r["measured"] / r["expected"] for r in g.evidence["by_layer_type"]} == {
        "full_attention": 2.0, "sliding_attention": 1.0}


def test_a_prefill_only_generation_is_judged_without_the_sliding_layers_prompt_view(tmp_path: Path) -> None:
    # recorded on the CPU: a gpt-oss-20b twin (8 kv heads x 64, float32: 4,096 bytes per token per
    # layer), a 200-token prompt and one new token: the generation ends at its prefill, where each
    # sliding layer (window 128) keeps 127 tokens as a view of the whole prompt's storage
    from analyzer_helpers import layer_rows, merge, run_row, step_rows, write_part

    config = {"num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "torch_dtype": "float32"}
    write_part(tmp_path, "run", run_row(config=config, layer_types=["sliding_attention", "full_attention"] * 2,
                                        dtype="float32", model_type="gpt_oss"))
    layers = [layer_rows("r1", 0, [0], layer, [200 * 4096], [127 if layer % 2 == 0 else 200],
                         "sliding_attention" if layer % 2 == 0 else "full_attention", "float32")
              for layer in range(4)]
    for rows in layers[::2]:  # the sliding layers' tensors are 127-token views: their logical bytes
        rows["k_bytes"], rows["v_bytes"] = [127 * 2048], [127 * 2048]
    write_part(tmp_path, "layers", merge(*layers))
    write_part(tmp_path, "steps", step_rows("r1", 0, [200], [4 * 200 * 4096]))
    (f,) = detect(tmp_path, "cache_density")
    assert (f.severity, f.value, f.threshold) == ("info", 4096.0, 4096.0)  # was a warning: 1.25x (5.01 KiB)


def test_a_hybrid_layers_recurrent_state_is_not_counted_as_kv(tmp_path: Path) -> None:
    # recorded on the CPU (falcon_h1, tiny): a hybrid layer's unique bytes hold K, V and the mamba
    # state (12,800 bytes, constant); K and V alone are 2 x 2 heads x 16 x float32 = 256 B per token
    from analyzer_helpers import layer_rows, merge, run_row, step_rows, write_part

    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "torch_dtype": "float32"}
    write_part(tmp_path, "run", run_row(config=config, layer_types=["hybrid"] * 2, dtype="float32",
                                        model_type="falcon_h1"))
    tokens = list(range(5, 29))
    layers = []
    for layer in range(2):
        rows = layer_rows("r1", 0, list(range(len(tokens))), layer, [256 * 2 * t + 12_800 for t in tokens],
                          tokens, "hybrid", "float32")
        rows["k_bytes"] = rows["v_bytes"] = [128 * 2 * t for t in tokens]  # batch 2
        layers.append(rows)
    write_part(tmp_path, "layers", merge(*layers))
    write_part(tmp_path, "steps", step_rows("r1", 0, tokens, [2 * (512 * t + 12_800) for t in tokens], batch=2))
    (f,) = detect(tmp_path, "cache_density")
    assert (f.severity, f.value, f.threshold) == ("info", 256.0, 256.0)  # was a warning: 1.89x (485 B)
