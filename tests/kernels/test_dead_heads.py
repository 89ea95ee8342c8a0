"""Planted conditions found end to end: KV samples → `kvscope kernels` → the analyser's findings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import add_samples

from kvscope.kernels.offline import compute_head_stats
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

pytest.importorskip("duckdb")
transformers = pytest.importorskip("transformers")

from kvscope.analyzer import analyze, load_traces  # noqa: E402


def _layer_kv(cache: object, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer, across the cache layouts transformers has had."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer][0], cache[layer][1]


def _tiny_llama(dead_layer: int, dead_head: int) -> tuple[object, int]:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    attn = model.model.layers[dead_layer].self_attn
    with torch.no_grad():
        rows = slice(dead_head * head_dim, (dead_head + 1) * head_dim)
        attn.k_proj.weight[rows] = 0.0
        attn.v_proj.weight[rows] = 0.0
    return model, head_dim


def test_a_planted_dead_head_is_found(tmp_path: Path) -> None:
    model, head_dim = _tiny_llama(dead_layer=1, dead_head=1)
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 24)), use_cache=True)
    samples = {}
    for layer in range(2):
        k, v = _layer_kv(out.past_key_values, layer)
        assert k.shape == (1, 2, 24, head_dim)
        samples[(0, 5, layer)] = {"k": k, "v": v}
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=2, num_kv_heads=2, head_dim=head_dim,
                                                            steps=6, device="cpu", model_type="llama"))
    add_samples(trace, samples)
    compute_head_stats(trace, device="cpu")
    with load_traces([trace]) as t:
        findings = analyze(t, ["dead_heads"])
    assert [(f.layer, f.evidence["heads"], f.severity) for f in findings] == [(1, [1], "warning")]
    assert findings[0].evidence["wasted_bytes"] > 0


def test_key_only_silence_is_not_a_dead_head(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=1, num_kv_heads=2, head_dim=8, steps=3,
                                                            device="cpu"))
    k = torch.randn(1, 2, 10, 8)
    k[:, 0] = 0.0  # keys silent, values alive: not dead
    add_samples(trace, {(0, 1, 0): {"k": k, "v": torch.randn(1, 2, 10, 8)}})
    compute_head_stats(trace, device="cpu")
    with load_traces([trace]) as t:
        assert analyze(t, ["dead_heads"]) == []


def test_concentrated_attention_gives_eviction_headroom(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=2, num_kv_heads=2, head_dim=16, steps=3,
                                                            device="cpu"))
    torch.manual_seed(3)
    k = torch.randn(1, 2, 64, 16)
    sharp = (k[:, :, [0, 1, 2]].sum(dim=2, keepdim=True) * 3).repeat_interleave(2, dim=1).expand(1, 4, 8, 16)
    add_samples(trace, {(0, 2, 0): {"k": k, "q": sharp.clone()}, (0, 2, 1): {"k": k, "q": torch.zeros(1, 4, 8, 16)}})
    compute_head_stats(trace, device="cpu")
    with load_traces([trace]) as t:
        findings = analyze(t, ["eviction_headroom"])
    assert len(findings) == 1 and findings[0].severity == "info"
    fractions = dict(zip(findings[0].evidence["layers"], findings[0].evidence["layer_fraction"], strict=True))
    assert fractions[0] > 0.8 and fractions[1] == 0.0  # uniform attention (q = 0) leaves nothing to evict
    assert 0.4 < findings[0].value < 0.6
