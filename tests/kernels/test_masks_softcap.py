"""The model's own masks (padding, chunks) and Gemma 2's logit softcap, in the Triton kernels
(interpreter, fp32) against the PyTorch reference and a float64 softmax; shared-memory tiling."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvscope import kernels  # noqa: E402
from kvscope.kernels import _triton_attn as tri  # noqa: E402
from kvscope.kernels import reference as ref  # noqa: E402
from kvscope.kernels._triton import AttnConfig, fit_config, tile_shared_bytes  # noqa: E402
from kvscope.kernels.api import as_bias  # noqa: E402


def _left_padded_bias(b: int, tq: int, tk: int, pads: list[int]) -> torch.Tensor:
    """Causal mask with left padding, as Hugging Face's eager masks are: 0 kept, min dropped."""
    pos = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    allowed = (j <= pos)[None].repeat(b, 1, 1)
    for row, pad in enumerate(pads):
        allowed[row, :, :pad] = False
    mask = torch.zeros(b, 1, tq, tk).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return mask


def _float64_stats(q, k, scale, bias, softcap):  # noqa: ANN001, ANN202
    group = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s + bias.double().clamp(min=-1e300)
    finite = bias > -1e30
    s = s.masked_fill(~finite, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    entropy = -torch.xlogy(p, p).sum(-1)
    return entropy, p


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("tq", [1, 23])
def test_padding_bias_and_softcap_match_float64(softcap: float | None, tq: int) -> None:
    torch.manual_seed(3)
    b, hq, hkv, tk, d = 2, 4, 2, 37, 16
    q, k = torch.randn(b, hq, tq, d) * 2, torch.randn(b, hkv, tk, d) * 2
    mask = _left_padded_bias(b, tq, tk, [0, 9])
    bias = as_bias(mask, q, k)
    want_h, p = _float64_stats(q, k, 0.3, bias, softcap)
    for fn in (lambda: tri.attention_entropy(q, k, 0.3, False, None, bias=bias, softcap=softcap),
               lambda: ref.attention_entropy(q, k, scale=0.3, causal=False, bias=bias, softcap=softcap)):
        h, lse = fn()
        rows = torch.isfinite(lse)
        torch.testing.assert_close(h[rows].double(), want_h[rows], rtol=1e-4, atol=1e-5)
    h, lse = tri.attention_entropy(q, k, 0.3, False, None, bias=bias, softcap=softcap)
    mass = tri.attention_mass(q, k, lse, 0.3, False, None, bias=bias, softcap=softcap)
    want_mass = p.sum(dim=2).reshape(b, hkv, hq // hkv, tk).sum(dim=2)
    torch.testing.assert_close(mass.double(), want_mass, rtol=1e-4, atol=1e-5)
    assert float(mass[1, :, :9].abs().max()) == 0.0  # pad keys get no mass


def test_bool_masks_and_short_masks_become_biases() -> None:
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 5, 8)
    keep = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    keep[..., 0] = False
    bias = as_bias(keep, q, k)
    assert bias.shape == (1, 1, 3, 5)
    assert torch.isinf(bias[..., 0]).all() and torch.isinf(bias[..., 4]).all()  # dropped, and beyond the mask
    assert (bias[..., 1:4] == 0).all()


def test_normalised_mass_counts_only_pairs_the_mask_keeps() -> None:
    torch.manual_seed(5)
    q, k = torch.randn(2, 2, 6, 8), torch.randn(2, 1, 6, 8)
    bias = as_bias(_left_padded_bias(2, 6, 6, [0, 2]), q, k)
    mass = kernels.attention_mass(q, k, causal=False, bias=bias, normalize=True)
    raw = ref.attention_mass(q, k, causal=False, bias=bias)
    # key 5 of the padded row is seen by 1 query (the last) x 2 heads; key 2 by 4 queries x 2 heads
    torch.testing.assert_close(mass[1, 0, 5], raw[1, 0, 5] / 2)
    torch.testing.assert_close(mass[1, 0, 2], raw[1, 0, 2] / 8)
    assert float(mass[1, 0, :2].abs().max()) == 0.0


@pytest.mark.parametrize("head_dim", [64, 128, 256, 512])
@pytest.mark.parametrize("element_size", [2, 4])
def test_tiles_fit_the_hopper_shared_memory_limit(head_dim: int, element_size: int) -> None:
    limit = 232_448  # H100/H200: 227 KiB per block
    for base, rows in ((AttnConfig(128, 64, 8, 3), "n"), (AttnConfig(128, 64, 4, 3), "m")):
        cfg = fit_config(base, head_dim, element_size, limit, stream_rows=rows)
        probe = cfg if rows == "n" else AttnConfig(cfg.block_n, cfg.block_m, 1, cfg.num_stages)
        assert tile_shared_bytes(probe, head_dim, element_size) <= limit
        assert min(cfg.block_m, cfg.block_n) >= 16
    # the failing launch of issue 13 (head_dim 256 asked 262,144 bytes) is shrunk, head_dim 128 bf16 is not
    assert fit_config(AttnConfig(128, 64, 8, 3), 128, 2, limit, stream_rows="n") == AttnConfig(128, 64, 8, 3)
    assert fit_config(AttnConfig(128, 64, 4, 3), 256, 2, limit, stream_rows="m") != AttnConfig(128, 64, 4, 3)


def test_launch_shrinks_tiles_when_triton_runs_out_of_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime.errors import OutOfResources

    seen: list[AttnConfig] = []

    def launch(cfg: AttnConfig) -> None:
        seen.append(cfg)
        if cfg.num_stages > 1:
            raise OutOfResources(262144, 232448, "shared memory")

    q = torch.zeros(1, 1, 1, 256)
    tri._WORKING.clear()
    tri._launch("entropy", q, None, AttnConfig(128, 64, 8, 3), launch)
    assert seen[0] == AttnConfig(128, 64, 8, 3) and seen[-1].num_stages == 1
    seen.clear()
    tri._launch("entropy", q, None, AttnConfig(128, 64, 8, 3), launch)  # the working shape is remembered
    assert len(seen) == 1 and seen[0].num_stages == 1
    tri._WORKING.clear()


def test_effective_rank_of_a_rank_one_latent_is_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 1) @ torch.randn(1, 512)  # rank 1, width 512
    assert kernels.latent_effective_rank(x) == pytest.approx(1.0, abs=1e-3)
    assert ref.latent_effective_rank(x) == pytest.approx(1.0, abs=1e-3)
