"""Triton kernels (interpreter, fp32) against the PyTorch reference: entropy, LSE, key mass."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kvscope import kernels  # noqa: E402
from kvscope.kernels import _triton_attn as tri  # noqa: E402
from kvscope.kernels import reference as ref  # noqa: E402
from kvscope.kernels._triton import interpreting  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5

# (B, Hq, Hkv, Tq, Tk, D, causal, window): block edges (tiles are 16), GQA, Tq < Tk, Tq > Tk, windows.
CASES = [
    (2, 4, 2, 37, 53, 24, True, None),
    (1, 2, 2, 33, 33, 16, True, None),
    (1, 6, 2, 5, 70, 40, True, None),
    (2, 4, 1, 29, 41, 8, False, None),
    (1, 4, 2, 45, 45, 32, True, 7),
    (1, 2, 1, 19, 50, 20, True, 1),
    (1, 2, 1, 70, 90, 16, True, 40),
    (1, 2, 1, 40, 18, 16, True, None),
]


def _ids(case: tuple) -> str:
    b, hq, hkv, tq, tk, d, causal, window = case
    return f"b{b}-h{hq}/{hkv}-q{tq}-k{tk}-d{d}-{'causal' if causal else 'full'}-w{window}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def _qk(case: tuple, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, hkv, tq, tk, d, _, _ = case
    return torch.randn(b, hq, tq, d) * spread, torch.randn(b, hkv, tk, d) * spread


def test_the_kernels_run_in_the_interpreter() -> None:
    assert interpreting()
    assert kernels.backend_for(torch.zeros(1)) == "triton"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_entropy_and_lse_match_reference(case: tuple) -> None:
    q, k = _qk(case, spread=1.5)
    causal, window = case[6], case[7]
    entropy, lse = kernels.attention_entropy(q, k, causal=causal, window=window)
    want_entropy, want_lse = ref.attention_entropy(q, k, causal=causal, window=window)
    assert entropy.shape == q.shape[:3] and entropy.dtype == torch.float32
    assert not torch.isnan(entropy).any()
    torch.testing.assert_close(entropy, want_entropy, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lse, want_lse, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_mass_matches_reference_raw_and_normalised(case: tuple) -> None:
    q, k = _qk(case)
    causal, window = case[6], case[7]
    _, lse = kernels.attention_entropy(q, k, causal=causal, window=window)
    mass = kernels.attention_mass(q, k, causal=causal, window=window, lse=lse)
    torch.testing.assert_close(mass, ref.attention_mass(q, k, causal=causal, window=window), rtol=RTOL, atol=ATOL)
    norm = kernels.attention_mass(q, k, causal=causal, window=window, normalize=True)
    want = ref.attention_mass(q, k, causal=causal, window=window, normalize=True)
    torch.testing.assert_close(norm, want, rtol=RTOL, atol=ATOL)
    assert float(norm.max()) <= 1.0 + 1e-6


def test_mass_of_every_key_sums_to_the_number_of_rows_that_see_a_key() -> None:
    q, k = torch.randn(1, 4, 21, 16), torch.randn(1, 2, 30, 16)
    mass = kernels.attention_mass(q, k)
    torch.testing.assert_close(mass.sum(dim=-1), torch.full((1, 2), 2 * 21.0), rtol=1e-5, atol=1e-4)


def test_split_keys_merge_to_the_same_result() -> None:
    q, k = torch.randn(1, 2, 7, 16), torch.randn(1, 1, 150, 16)
    want_entropy, want_lse = ref.attention_entropy(q, k, scale=0.3, window=60)
    for splits in (2, 3, 10):
        entropy, lse = tri.attention_entropy(q, k, 0.3, True, 60, splits=splits)
        torch.testing.assert_close(entropy, want_entropy, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(lse, want_lse, rtol=RTOL, atol=ATOL)


def test_one_hot_rows_have_zero_entropy_and_no_nan() -> None:
    tk, d = 37, 16
    k = torch.randn(1, 1, tk, d) * 0.01
    k[0, 0, 22] = 0.0
    k[0, 0, 22, 3] = 1e4  # logit 1e4 / sqrt(16) = 2500 against about 0 for every other key
    q = torch.zeros(1, 2, 3, d)
    q[..., 3] = 1.0
    entropy, lse = kernels.attention_entropy(q, k, causal=False)
    assert not torch.isnan(entropy).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(entropy, torch.zeros_like(entropy), rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, torch.full_like(lse, 2500.0), rtol=1e-6, atol=0)
    mass = kernels.attention_mass(q, k, causal=False, lse=lse)
    want = torch.zeros(1, 1, tk)
    want[0, 0, 22] = 6.0
    torch.testing.assert_close(mass, want, rtol=1e-6, atol=1e-6)


def test_uniform_rows_have_entropy_log_tk() -> None:
    tk = 45
    q, k = torch.randn(2, 2, 9, 16), torch.ones(2, 1, tk, 16)
    q = q - q.mean(dim=-1, keepdim=True)  # q·k = 0 for every key
    entropy, _ = kernels.attention_entropy(q, k, causal=False)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(tk)), rtol=RTOL, atol=0)
    causal, _ = kernels.attention_entropy(q, k)  # query i sees tk - 9 + i + 1 keys
    want = torch.log(torch.arange(tk - 9 + 1, tk + 1, dtype=torch.float32)).expand_as(causal)
    torch.testing.assert_close(causal, want, rtol=RTOL, atol=0)


def test_extreme_logits_stay_finite() -> None:
    q, k = torch.randn(1, 2, 20, 16) * 300, torch.randn(1, 1, 33, 16) * 300
    entropy, lse = kernels.attention_entropy(q, k, window=5)
    want_entropy, want_lse = ref.attention_entropy(q, k, window=5)
    assert torch.isfinite(entropy).all() and torch.isfinite(lse).all()
    assert float(entropy.min()) >= 0.0
    torch.testing.assert_close(entropy, want_entropy, rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(lse, want_lse, rtol=RTOL, atol=0)
    mass = kernels.attention_mass(q, k, window=5, lse=lse)
    assert torch.isfinite(mass).all()


def test_rows_without_visible_keys_are_zero_entropy_and_minus_inf_lse() -> None:
    q, k = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 12, 16)
    entropy, lse = kernels.attention_entropy(q, k)
    assert torch.isinf(lse[0, 0, :8]).all() and torch.isfinite(lse[0, 0, 8:]).all()
    assert float(entropy[0, 0, :8].abs().max()) == 0.0
    mass = kernels.attention_mass(q, k, lse=lse)
    torch.testing.assert_close(mass.sum(), torch.tensor(12.0), rtol=1e-5, atol=1e-4)


def test_non_contiguous_queries_as_transformers_makes_them() -> None:
    b, t, h, d = 1, 23, 4, 16
    q = torch.randn(b, t, h, d).transpose(1, 2)
    k = torch.randn(b, t, 2, d).transpose(1, 2)
    assert not q.is_contiguous()
    entropy, _ = kernels.attention_entropy(q, k)
    torch.testing.assert_close(entropy, ref.attention_entropy(q, k)[0], rtol=RTOL, atol=ATOL)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention_entropy(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="window"):
        kernels.attention_entropy(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), causal=False, window=3)
    with pytest.raises(ValueError, match="lse"):
        kernels.attention_mass(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), lse=torch.zeros(1, 2, 5))
