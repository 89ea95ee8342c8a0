"""`kvscope kernels TRACE` over kv_samples, and the dead_heads / eviction_headroom / mla_latent findings."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from kernel_helpers import add_samples

from kvscope.cli.main import main
from kvscope.kernels.offline import compute_head_stats, decode_tensor
from kvscope.trace.reader import open_trace
from kvscope.trace.synth import SynthSpec, build_synthetic_trace


def head_stats(trace: Path) -> list[dict]:
    return open_trace(trace).read("head_stats").to_pylist()


def test_decode_tensor_round_trips_bfloat16() -> None:
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    raw = x.view(-1).view(torch.uint8).numpy().tobytes()
    assert torch.equal(decode_tensor(raw, [2, 3, 4], "bfloat16"), x)


def test_offline_stats_from_k_v_q_samples(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=2, num_kv_heads=2, head_dim=16, steps=4,
                                                            device="cpu"))
    torch.manual_seed(0)
    k = torch.randn(1, 2, 30, 16)
    k[:, 1] *= 0.0
    v = torch.randn(1, 2, 30, 16) * 2
    q = torch.randn(1, 4, 6, 16)
    add_samples(trace, {(0, 3, 0): {"k": k, "v": v, "q": q}, (0, 3, 1): {"k": k.to(torch.bfloat16)}})
    result = compute_head_stats(trace, device="cpu")
    rows = head_stats(trace)
    assert result.samples == 2 and result.rows == len(rows)
    assert {r["source"] for r in rows} == {"offline"}
    got = {(r["layer"], r["head"], r["stat"]): r["value"] for r in rows}
    norms = torch.linalg.vector_norm(v, dim=-1)
    assert got[(0, 0, "value_norm_mean")] == pytest.approx(float(norms[0, 0].mean()), rel=1e-5)
    assert got[(0, 1, "value_norm_max")] == pytest.approx(float(norms[0, 1].max()), rel=1e-5)
    assert got[(0, 1, "key_norm_max")] == 0.0 and got[(1, 1, "key_norm_mean")] == 0.0
    assert {h for (layer, h, s) in got if s == "entropy_mean" and layer == 0} == {0, 1, 2, 3}
    assert 0.0 < got[(0, 0, "entropy_mean")] < float(torch.log(torch.tensor(30.0)))
    # kv head 1 has zero keys: its queries attend uniformly, so no key is below a tenth of uniform.
    assert got[(0, 1, "low_mass_fraction")] == 0.0
    assert (1, 0, "entropy_mean") not in got  # no q sample for layer 1


def test_the_cli_appends_and_refuses_to_duplicate(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=1, num_kv_heads=2, head_dim=8, steps=2,
                                                            device="cpu"))
    add_samples(trace, {(0, 1, 0): {"k": torch.randn(1, 2, 9, 8), "v": torch.randn(1, 2, 9, 8)}})
    assert main(["kernels", str(trace)]) == 0
    first = len(head_stats(trace))
    assert first == 2 * 4
    assert main(["kernels", str(trace)]) == 2  # already there
    assert main(["kernels", str(trace), "--replace"]) == 0
    assert len(head_stats(trace)) == first
    empty = build_synthetic_trace(tmp_path / "e", SynthSpec(num_layers=1, steps=2, device="cpu"))
    assert main(["kernels", str(empty)]) == 2


def test_latent_samples_give_effective_rank_and_mla_findings(tmp_path: Path) -> None:
    spec = SynthSpec(num_layers=2, layer_types=("latent", "latent"), kv_lora_rank=32, qk_rope_head_dim=8,
                     num_attention_heads=4, steps=3, device="cpu", model_type="deepseek_v3")
    trace = build_synthetic_trace(tmp_path / "mla", spec)
    torch.manual_seed(1)
    low_rank = (torch.randn(40, 2) @ torch.randn(2, 32)).reshape(1, 1, 40, 32)
    add_samples(trace, {(0, 2, 0): {"latent": low_rank}, (0, 2, 1): {"k": torch.randn(1, 1, 40, 32)}})
    compute_head_stats(trace, device="cpu")
    got = {(r["layer"], r["stat"]): r["value"] for r in head_stats(trace)}
    assert got[(0, "latent_width")] == 32.0
    assert 1.0 < got[(0, "latent_effective_rank")] < 2.5
    assert got[(1, "latent_effective_rank")] > 16.0
    pytest.importorskip("duckdb")
    from kvscope.analyzer import analyze, load_traces

    _patch_config(trace, {"qk_nope_head_dim": 16, "v_head_dim": 16, "num_attention_heads": 4})
    with load_traces([trace]) as t:
        findings = analyze(t, ["mla_latent"])
    ranks = [f for f in findings if f.metric == "latent_rank_fraction"]
    assert [f.layer for f in ranks] == [0]
    assert any(f.metric == "mla_compression" for f in findings)


def _patch_config(trace: Path, extra: dict) -> None:
    """Add keys to the run's model_config in place (the synthetic MLA config has no nope/v dims)."""
    (part,) = sorted((trace / "run").glob("part-*.parquet"))
    table = pq.read_table(part)
    config = {**json.loads(table["model_config"][0].as_py()), **extra}
    index = table.schema.get_field_index("model_config")
    table = table.set_column(index, table.schema.field(index), pa.array([json.dumps(config)]))
    pq.write_table(table, part)


def test_row_values_are_plain_numbers(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=1, num_kv_heads=1, head_dim=4, steps=2,
                                                            device="cpu"))
    add_samples(trace, {(0, 0, 0): {"k": torch.ones(2, 1, 3, 4), "v": torch.ones(2, 1, 3, 4)}})
    compute_head_stats(trace, device="cpu")
    table = open_trace(trace).read("head_stats")
    assert pc.all(pc.equal(table["value"], 2.0)).as_py()
    assert set(table["tokens"].to_pylist()) == {6}


def test_offline_statistics_use_the_recorded_scaling_and_softcap() -> None:
    from kvscope.kernels import reference as ref
    from kvscope.kernels.offline import _Rows, stats_for_sample

    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 6, 16) * 3, torch.randn(1, 1, 6, 16) * 3
    rows = _Rows()
    stats_for_sample(("r", 0, 0, 0), {"q": q, "k": k}, rows, layer_type="full_attention", window=None,
                     low_mass_threshold=0.1, scale=24 ** -0.5, softcap=5.0)
    got = [v for s, v in zip(rows.columns["stat"], rows.columns["value"], strict=True) if s == "entropy_mean"]
    want = ref.attention_entropy(q, k, scale=24 ** -0.5, softcap=5.0)[0].mean(dim=(0, 2))
    plain = ref.attention_entropy(q, k)[0].mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)
    assert float((want - plain).abs().max()) > 1e-2  # 1/sqrt(D) without the cap would read otherwise


@pytest.mark.parametrize("preallocated", [False, True])
def test_mla_compression_of_a_static_latent_cache_counts_its_capacity(tmp_path: Path, preallocated: bool) -> None:
    """A preallocated latent cache's bytes cover its capacity (4x the tokens used here): the compression
    is per token of capacity, the same as a dynamic cache's, not 4x weaker (on the H200 a static
    deepseek-v2-lite cache of 8.1x its use read 'decompressed keys and values', 1.1x of 8.9x)."""
    pytest.importorskip("duckdb")
    from kvscope.analyzer import analyze, load_traces

    spec = SynthSpec(num_layers=2, layer_types=("latent", "latent"), kv_lora_rank=32, qk_rope_head_dim=8,
                     num_attention_heads=4, steps=3, device="cpu", model_type="deepseek_v3", preallocated=preallocated)
    trace = build_synthetic_trace(tmp_path / "mla", spec)
    _patch_config(trace, {"qk_nope_head_dim": 16, "v_head_dim": 16, "num_attention_heads": 4})
    with load_traces([trace]) as t:
        (finding,) = [f for f in analyze(t, ["mla_latent"]) if f.metric == "mla_compression"]
    # per head and token: 4 heads x (16 + 8 + 16) = 160 elements; the latent: 32 + 8 = 40
    assert finding.severity == "info" and finding.value == pytest.approx(4.0)
