"""Per-token norms, the Gram kernel, effective rank and the MLA compression ratio."""

from __future__ import annotations

import math

import pytest
import torch

from kvscope.kernels import mla, reference


def test_reference_norms_and_erank_without_triton() -> None:
    x = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
    assert reference.head_norms(x).tolist() == [[[5.0, 0.0]]]
    assert reference.latent_effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert reference.latent_effective_rank(torch.zeros(4, 3)) == 0.0


def test_erank_bounds_and_examples() -> None:
    assert mla.erank_from_eigenvalues([4.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert mla.erank_from_eigenvalues([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert 1.0 < mla.erank_from_eigenvalues([9.0, 1.0]) < 2.0
    assert mla.erank_from_eigenvalues([-1e-9, 0.0]) == 0.0


def test_mla_compression_ratio_of_deepseek_v3() -> None:
    config = {"num_attention_heads": 128, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
              "kv_lora_rank": 512}
    assert mla.mla_compression_ratio(config) == pytest.approx((128 * 192 + 128 * 128) / 576)
    assert mla.mla_compression_ratio({"text_config": config}) == pytest.approx(71.111, rel=1e-4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla.mla_compression_ratio({**config, "kv_lora_rank": None})
    assert not mla.is_mla_config({"num_attention_heads": 8})


class TestTritonInterpreter:
    @pytest.fixture(autouse=True)
    def _needs_triton(self) -> None:
        pytest.importorskip("triton")
        torch.manual_seed(7)

    @pytest.mark.parametrize("shape", [(2, 3, 37, 20), (1, 1, 1, 1), (1, 2, 130, 128), (1, 1, 0, 8)])
    def test_head_norms_match_reference(self, shape: tuple[int, ...]) -> None:
        from kvscope.kernels import head_norms

        x = torch.randn(shape) * 3
        out = head_norms(x)
        assert out.shape == shape[:3] and out.dtype == torch.float32
        torch.testing.assert_close(out, reference.head_norms(x), rtol=1e-4, atol=1e-6)

    def test_head_norms_of_bfloat16_and_strided_input(self) -> None:
        from kvscope.kernels import head_norms

        x = torch.randn(1, 20, 4, 24).transpose(1, 2)  # [1, 4, 20, 24], not contiguous
        torch.testing.assert_close(head_norms(x), reference.head_norms(x), rtol=1e-4, atol=1e-6)
        xb = x.to(torch.bfloat16)
        torch.testing.assert_close(head_norms(xb), reference.head_norms(xb), rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("shape", [(45, 37), (3, 70), (100, 16), (0, 5)])
    def test_gram_matches_reference(self, shape: tuple[int, int]) -> None:
        from kvscope.kernels import gram

        x = torch.randn(shape)
        torch.testing.assert_close(gram(x), reference.gram(x).float(), rtol=1e-4, atol=1e-4)

    def test_latent_effective_rank_finds_the_planted_rank(self) -> None:
        from kvscope.kernels import latent_effective_rank

        x = torch.randn(200, 3) @ torch.randn(3, 48)  # rank 3 in a width of 48
        erank = latent_effective_rank(x)
        # fp32 rounding leaves σ ~ sqrt(eps)·σ_max in the 45 empty directions: agree to 1e-2 only.
        assert erank == pytest.approx(reference.latent_effective_rank(x), rel=1e-2)
        assert 2.5 < erank <= 3.2
        y = torch.randn(400, 48)
        full = latent_effective_rank(y)
        assert full == pytest.approx(reference.latent_effective_rank(y), rel=1e-4)
        assert 40.0 < full <= 48.0 and math.isfinite(full)
