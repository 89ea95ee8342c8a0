"""The compiled kernels on a CUDA device against the reference; online and offline paths on the GPU.

Run on a GPU machine with ``KVSCOPE_GPU_TESTS=1 python -m pytest -q tests/kernels/test_kernels_gpu.py``
(the variable keeps the conftest from switching Triton to its interpreter). Skipped elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton is in interpreter mode"),
]
pytest.importorskip("triton")

from kernel_helpers import add_samples  # noqa: E402

from kvscope import kernels  # noqa: E402
from kvscope.kernels import _triton_attn, reference  # noqa: E402

DEV = "cuda"
CASES = [  # default GPU tiles are 128 x 64: these cut them at every edge
    (2, 8, 2, 300, 517, 64, True, None),
    (1, 4, 4, 200, 200, 128, True, 64),
    (1, 8, 2, 33, 1000, 80, False, None),
    (1, 32, 8, 5, 3000, 128, True, None),  # decode-style: key splits and the merge kernel
    (1, 4, 1, 700, 300, 32, True, None),  # more queries than keys: empty rows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference_on_gpu(case: tuple, dtype: torch.dtype) -> None:
    b, hq, hkv, tq, tk, d, causal, window = case
    torch.manual_seed(hash(case) % 1000)
    q = (torch.randn(b, hq, tq, d, device=DEV) * 2).to(dtype)
    k = (torch.randn(b, hkv, tk, d, device=DEV) * 2).to(dtype)
    entropy, lse = kernels.attention_entropy(q, k, causal=causal, window=window)
    want_entropy, want_lse = reference.attention_entropy(q.double(), k.double(), causal=causal, window=window)
    torch.testing.assert_close(entropy, want_entropy.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-4, atol=1e-4)
    mass = kernels.attention_mass(q, k, causal=causal, window=window, lse=lse, normalize=True)
    want = reference.attention_mass(q.double(), k.double(), causal=causal, window=window, normalize=True)
    torch.testing.assert_close(mass, want.float(), rtol=1e-4, atol=1e-6)


def test_split_counts_agree_on_gpu() -> None:
    q, k = torch.randn(1, 8, 3, 64, device=DEV), torch.randn(1, 2, 5000, 64, device=DEV)
    want = _triton_attn.attention_entropy(q, k, 0.125, True, None, splits=1)
    for splits in (2, 7, 40):
        got = _triton_attn.attention_entropy(q, k, 0.125, True, None, splits=splits)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_norms_gram_and_extreme_logits_on_gpu() -> None:
    x = torch.randn(2, 8, 1001, 128, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.head_norms(x), reference.head_norms(x), rtol=1e-4, atol=1e-4)
    lat = torch.randn(777, 576, device=DEV)
    torch.testing.assert_close(kernels.gram(lat), reference.gram(lat.double()).float(), rtol=1e-4, atol=1e-2)
    q, k = torch.randn(1, 4, 50, 64, device=DEV) * 300, torch.randn(1, 2, 90, 64, device=DEV) * 300
    entropy, lse = kernels.attention_entropy(q, k, window=9)
    assert torch.isfinite(entropy).all() and torch.isfinite(lse).all() and float(entropy.min()) >= 0.0


def test_online_and_offline_on_gpu(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from kvscope.kernels.offline import compute_head_stats
    from kvscope.kernels.online import HeadStatsCollector
    from kvscope.trace.reader import open_trace
    from kvscope.trace.synth import SynthSpec, build_synthetic_trace

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(DEV, torch.bfloat16).eval()
    collector = HeadStatsCollector(2)
    with collector.install(model), torch.no_grad():
        model.generate(torch.randint(0, 96, (2, 300), device=DEV), max_new_tokens=5, do_sample=False)
    columns = collector.drain()
    assert set(columns["step"]) == {0, 2, 4}
    assert all(v == v and abs(v) < 1e6 for v in columns["value"])
    trace = build_synthetic_trace(tmp_path / "t", SynthSpec(num_layers=1, num_kv_heads=2, head_dim=64, steps=2))
    k = torch.randn(1, 2, 400, 64, dtype=torch.bfloat16)
    add_samples(trace, {(0, 1, 0): {"k": k, "v": k * 2, "q": torch.randn(1, 8, 16, 64, dtype=torch.bfloat16)}})
    result = compute_head_stats(trace)
    assert result.device.startswith("cuda") and result.backend == "triton"
    rows = open_trace(trace).read("head_stats").to_pylist()
    got = {(r["head"], r["stat"]): r["value"] for r in rows}
    want = reference.head_norms(k)[0, 1].mean().item()
    assert got[(1, "key_norm_mean")] == pytest.approx(want, rel=1e-3)
    assert got[(1, "value_norm_mean")] == pytest.approx(2 * want, rel=1e-3)


@pytest.mark.parametrize("head_dim", [256, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_head_dims_with_a_padding_mask_and_softcap_on_gpu(head_dim: int, dtype: torch.dtype) -> None:
    """Gemma 3 (256) and Gemma 4 full layers (512): tiles fit the shared memory; masks and softcap."""
    torch.manual_seed(head_dim)
    b, hq, hkv, tq, tk = 2, 8, 4, 300, 300
    q = (torch.randn(b, hq, tq, head_dim, device=DEV) * 0.5).to(dtype)
    k = (torch.randn(b, hkv, tk, head_dim, device=DEV) * 0.5).to(dtype)
    keep = torch.ones(b, 1, tq, tk, dtype=torch.bool, device=DEV).tril()
    keep[1, :, :, :40] = False  # left padding of the second row
    bias = kernels.as_bias(keep, q, k)
    entropy, lse = kernels.attention_entropy(q, k, causal=False, bias=bias, softcap=50.0, scale=0.0625)
    want_entropy, want_lse = reference.attention_entropy(q.double(), k.double(), causal=False, bias=bias,
                                                         softcap=50.0, scale=0.0625)
    rows = torch.isfinite(want_lse)
    torch.testing.assert_close(entropy[rows], want_entropy.float()[rows], rtol=1e-4, atol=2e-4)
    mass = kernels.attention_mass(q, k, causal=False, bias=bias, softcap=50.0, scale=0.0625, lse=lse, normalize=True)
    want = reference.attention_mass(q.double(), k.double(), causal=False, bias=bias, softcap=50.0, scale=0.0625,
                                    normalize=True)
    torch.testing.assert_close(mass, want.float(), rtol=1e-3, atol=1e-5)
    assert float(mass[1, :, :40].abs().max()) == 0.0
