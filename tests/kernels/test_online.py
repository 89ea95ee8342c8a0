"""Online head statistics through transformers' attention-function registry (CPU, tiny llama)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.modeling_utils", reason="needs the attention-function registry")

from kvscope.kernels.online import IMPLEMENTATION_PREFIX, HeadStatsCollector  # noqa: E402


def _model(attn: str) -> object:
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _rows(columns: dict) -> list[dict]:
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_unchanged_and_stats_every_n_steps(attn: str) -> None:
    model = _model(attn)
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
    collector = HeadStatsCollector(2, run_id="r")
    with collector.install(model), torch.no_grad():
        assert model.config._attn_implementation == IMPLEMENTATION_PREFIX + attn
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert model.config._attn_implementation == attn
    assert torch.equal(got, want)
    rows = _rows(collector.drain())
    assert {r["step"] for r in rows} == {0, 2, 4}
    assert {r["layer"] for r in rows} == {0, 1} and {r["source"] for r in rows} == {"online"}
    stats = {(r["step"], r["layer"], r["stat"], r["head"]): r for r in rows}
    assert {h for (s, la, st, h) in stats if st == "entropy_mean" and s == 0 and la == 0} == {0, 1, 2, 3}
    assert {h for (s, la, st, h) in stats if st == "key_norm_max" and s == 0 and la == 0} == {0, 1}
    assert stats[(0, 0, "key_norm_max", 0)]["tokens"] == 7
    assert stats[(4, 0, "entropy_mean", 0)]["tokens"] == 7 + 4  # decode step 4 reads 11 keys
    assert collector.drain()["stat"] == []


def test_prefill_entropy_matches_eager_attention_weights() -> None:
    model = _model("eager")
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
    collector = HeadStatsCollector(1)
    with collector.install(model), torch.no_grad():
        model(ids)
    rows = _rows(collector.drain())
    for layer in range(2):
        want = torch.special.entr(weights[layer].float()).sum(dim=-1).mean(dim=(0, 2))
        got = torch.tensor([r["value"] for r in sorted(rows, key=lambda r: r["head"])
                            if r["layer"] == layer and r["stat"] == "entropy_mean"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_collector_refuses_bad_settings_and_double_install() -> None:
    with pytest.raises(ValueError):
        HeadStatsCollector(0)
    model = _model("sdpa")
    collector = HeadStatsCollector(3).install(model)
    with pytest.raises(RuntimeError):
        collector.install(model)
    collector.uninstall()
    assert model.config._attn_implementation == "sdpa"


def test_recording_with_head_stats_every_writes_online_rows(tmp_path) -> None:  # noqa: ANN001
    from kvscope.recorder.session import record
    from kvscope.trace.reader import open_trace

    model = _model("sdpa")
    ids = torch.randint(0, 96, (1, 6))
    with record(model, tmp_path / "t", head_stats_every=3) as rec, torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        rec.settle()
        model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"
    rows = open_trace(tmp_path / "t").read("head_stats").to_pylist()
    assert {(r["gen_id"], r["step"]) for r in rows} == {(0, 0), (0, 3), (1, 0)}
    assert {r["source"] for r in rows} == {"online"}
    assert {r["stat"] for r in rows} == {"key_norm_mean", "key_norm_max", "value_norm_mean", "value_norm_max",
                                         "entropy_mean", "low_mass_fraction"}


@pytest.mark.parametrize(("tq", "tk", "window"), [(1, 37, None), (1, 37, 8), (9, 9, None), (9, 21, 5)])
def test_unmasked_fast_path_equals_the_general_path(tq: int, tk: int, window: int | None) -> None:
    """A step with no 4D mask, padding or sinks takes the per-pass shared path; a collector that
    keeps raw values takes the general one: the statistics they write must be the same."""
    gen = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 6, tq, 16, generator=gen)
    k = torch.randn(2, 3, tk, 16, generator=gen)
    v = torch.randn(2, 3, tk, 16, generator=gen)
    # threshold 1: keys below the mean mass are "low", so the fractions are neither 0 nor 1
    fast, general = HeadStatsCollector(1, low_mass_threshold=1.0), HeadStatsCollector(1, low_mass_threshold=1.0, keep_raw=True)
    for collector in (fast, general):
        collector.step = 0
        for layer in range(2):  # the second layer reuses the first one's shared tensors
            collector.observe(layer, q * (layer + 1), k, v, scale=0.3, window=window)
    got, want = fast.drain(), general.drain()
    assert got["stat"] == want["stat"] and len(got["stat"]) == 2 * (4 * 3 + 6 + 3)  # per layer: norms per kv head, entropy per query head, low mass per kv head
    fractions = [v for s, v in zip(want["stat"], want["value"], strict=True) if s == "low_mass_fraction"]
    assert any(0.0 < f < 1.0 for f in fractions)  # the comparison covers a non-trivial fraction
    torch.testing.assert_close(torch.tensor(got["value"]), torch.tensor(want["value"]), rtol=1e-6, atol=1e-7)
    assert got["tokens"] == want["tokens"]
