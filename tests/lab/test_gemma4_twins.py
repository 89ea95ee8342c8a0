"""Gemma 4 twins (KV-shared layers, per-layer geometry) and GLM-4.7-Flash's latent cache, recorded on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvscope.analyzer import analyze, load_traces
from kvscope.recorder.session import Recording
from kvscope.twins import list_twins, load_twin, shrink_config
from kvscope.twins.spec import kv_geometry

GEMMA4 = {  # name: (layers, sliding kv heads, full kv heads, KV-shared layers, window, full every)
    "gemma-4-e2b": (35, 1, 1, 20, 512, 5),
    "gemma-4-e4b": (42, 2, 2, 18, 512, 6),
    "gemma-4-26b-a4b": (30, 8, 2, 0, 1024, 6),
    "gemma-4-31b": (60, 16, 4, 0, 1024, 6),
}


def _transformers_has(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@pytest.mark.parametrize("name", sorted(GEMMA4))
def test_gemma4_geometry_survives_shrinking(name: str) -> None:
    assert name in list_twins()
    spec = load_twin(name)
    layers, kv, full_kv, shared, window, every = GEMMA4[name]
    cfg = spec.config
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["sliding_window"]) == (
        "gemma4_text", layers, kv, window)
    assert (cfg["head_dim"], cfg["global_head_dim"], cfg["num_kv_shared_layers"]) == (256, 512, shared)
    assert cfg.get("num_global_key_value_heads", kv) == full_kv
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == list(range(every - 1, layers, every))
    small = shrink_config(spec)
    assert kv_geometry(small.config) == kv_geometry(cfg)
    assert small.config["vocab_size"] == 512 and small.config.get("vocab_size_per_layer_input", 512) == 512
    assert small.config.get("top_k_experts", 2) <= 2 and small.config.get("num_experts", 4) <= 4


def _record(name: str, out: Path, new: int = 40, layers: int | None = None) -> Path:
    import dataclasses

    from kvscope.twins.build import build_twin

    spec = shrink_config(load_twin(name))
    if layers is not None:  # the first layers only (no layer types to cut: the MLA twin)
        spec = dataclasses.replace(spec, config={**spec.config, "num_hidden_layers": layers})
    model = build_twin(spec, dtype="bfloat16", device="cpu")
    with Recording(model, out, writer="thread", model_name=name) as rec:
        ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False)
        del output
        rec.settle()
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _transformers_has("gemma4_text"), reason="this transformers has no gemma4_text")
def test_gemma4_e2b_kv_shared_layers_hold_no_cache_and_are_reported(tmp_path: Path) -> None:
    trace = _record("gemma-4-e2b", tmp_path / "e2b")
    with load_traces([trace]) as tables:
        (run,) = tables.records("SELECT num_layers, len(layer_types) AS declared FROM run")
        layers = tables.records("""SELECT layer, layer_type, k_shape, kv_bytes / stored_tokens AS per_token FROM layers
                                   WHERE step = (SELECT max(step) FROM layers) ORDER BY layer""")
        findings = analyze(tables)
    assert run == {"num_layers": 35, "declared": 35}
    # layers 15-34 reuse layers 13 and 14: no rows of their own, never counted
    assert [r["layer"] for r in layers] == list(range(15))
    full = [r for r in layers if r["layer_type"] == "full_attention"]
    assert [r["layer"] for r in full] == [4, 9, 14]
    # sliding: 1 kv head x 256 (1 KiB per token in bf16); full: 1 kv head x 512 (2 KiB)
    assert {r["per_token"] for r in layers if r["layer_type"] == "sliding_attention"} == {1024.0}
    assert {r["per_token"] for r in full} == {2048.0}
    assert [f for f in findings if f.severity != "info"] == []
    (uniformity,) = [f for f in findings if f.detector == "layer_uniformity"]
    assert "over the 15 layers that hold a cache (of the model's 35: 20 KV-shared layers reuse an earlier " \
           "layer's cache) in 2 modes" in uniformity.message
    assert uniformity.evidence["mode_ratio"] == "4:1"
    assert (uniformity.evidence["cache_layers"], uniformity.evidence["kv_shared_layers"]) == (15, 20)
    (density,) = [f for f in findings if f.detector == "cache_density"]
    assert (density.value, density.threshold) == (1024.0, 1024.0)  # judged by the median layer


@pytest.mark.slow
@pytest.mark.skipif(not _transformers_has("glm4_moe_lite"), reason="this transformers has no glm4_moe_lite")
def test_glm_4_7_flash_caches_the_1152_byte_latent(tmp_path: Path) -> None:
    import transformers

    # 4 of its 47 layers (one dense, three MoE): every layer caches the same latent
    trace = _record("glm-4.7-flash", tmp_path / "glm", new=16, layers=4)
    with load_traces([trace]) as tables:
        per_token = tables.rows("""SELECT DISTINCT kv_bytes / stored_tokens, layer_type FROM layers
                                  WHERE step = (SELECT max(step) FROM layers)""")
        findings = analyze(tables)
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if (major, minor) < (5, 15):
        pytest.skip(f"transformers {transformers.__version__} caches decompressed per-head K/V")
    # (kv_lora_rank 512 + qk_rope_head_dim 64) x 2 bytes
    assert per_token == [(1152.0, "latent")]
    (mla,) = [f for f in findings if f.detector == "mla_latent"]
    assert mla.value == pytest.approx(17.78, abs=0.01)  # 20 x (192 + 64 + 256) / 576
    assert [f for f in findings if f.severity != "info"] == []
