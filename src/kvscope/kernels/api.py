"""Public kernel functions: argument checks, then Triton or the PyTorch reference.

Dispatch: CUDA tensors run the compiled Triton kernels; CPU tensors run them in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were first used; anything else
(or no Triton installed) runs the reference in ``kvscope.kernels.reference``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from types import ModuleType

import torch

from kvscope.kernels import reference
from kvscope.kernels.mla import erank_from_eigenvalues

_TRITON: ModuleType | None = None
_ATTN: ModuleType | None = None
_warned = False


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_module() -> ModuleType:
    global _TRITON
    if _TRITON is None:
        from kvscope.kernels import _triton

        _TRITON = _triton
    return _TRITON


def _attn_module() -> ModuleType:
    global _ATTN
    if _ATTN is None:
        from kvscope.kernels import _triton_attn

        _ATTN = _triton_attn
    return _ATTN


def backend_for(x: torch.Tensor) -> str:
    """"triton" or "reference": where a call on this tensor runs."""
    global _warned
    if x.is_cuda:
        if triton_available():
            return "triton"
        if not _warned:
            warnings.warn("triton is not installed: kvscope kernels run the PyTorch reference on the GPU", stacklevel=3)
            _warned = True
        return "reference"
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available() and x.device.type == "cpu":
        return "triton"
    return "reference"


def _for_triton(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On the interpreter (CPU) bfloat16 is unsupported: compute those in float32."""
    return tuple(x.float() if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x for x in xs)


def head_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms of a cache tensor x [B, H, T, D] → [B, H, T] fp32."""
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions [B, H, T, D], got shape {tuple(x.shape)}")
    if backend_for(x) == "triton":
        return _triton_module().head_norms(*_for_triton(x))
    return reference.head_norms(x)


def as_bias(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A model's attention mask as an additive fp32 bias [B, 1 or Hq, Tq, Tk]: -inf where dropped.

    Accepts a boolean mask (True = attend, PyTorch SDPA's convention) or an additive float mask
    (Hugging Face's eager masks: 0 kept, the dtype's minimum dropped), of shape [B, 1 or Hq, Tq, Tk]
    or [B, Tq, Tk]; keys beyond the mask's length are dropped (a mask never covers keys it does not
    know)."""
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4:
        raise ValueError(f"an attention mask must have 3 or 4 dimensions, got shape {tuple(mask.shape)}")
    b, hq, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq) or mask.shape[2] not in (1, tq):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit q {tuple(q.shape)}")
    mask = mask[..., :tk]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    else:
        floor = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else -1e30
        bias = mask.float().masked_fill(mask <= floor, float("-inf"))
    if bias.shape[-1] < tk:
        bias = torch.nn.functional.pad(bias, (0, tk - bias.shape[-1]), value=float("-inf"))
    return bias.expand(b, bias.shape[1], tq, tk)


def attention_entropy(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = True, window: int | None = None,
    bias: torch.Tensor | None = None, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log-sum-exp of each query's attention row, each [B, Hq, Tq] fp32.

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D] with Hq a multiple of Hkv (grouped-query attention).
    Queries are aligned to the end of the keys (query i sits at key position i + Tk - Tq);
    causal keeps keys j <= that position, a window W keeps position - W < j <= position.
    `bias` [B, 1 or Hq, Tq, Tk] (see `as_bias`) is the model's own mask, added after the scale and
    the `softcap` (c·tanh(x / c), Gemma 2): padding, windows, chunks. One streaming pass: no
    Tq x Tk matrix exists on the Triton path besides the bias. Rows that see no key get entropy 0
    and LSE -inf.
    """
    reference.check_attention_args(q, k, causal=causal, window=window)
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    softcap = float(softcap) if softcap else None
    if backend_for(q) == "triton":
        return _attn_module().attention_entropy(*_for_triton(q, k), scale, causal, window, bias=bias,
                                                softcap=softcap)
    return reference.attention_entropy(q, k, scale=scale, causal=causal, window=window, bias=bias, softcap=softcap)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    lse: torch.Tensor | None = None,
    normalize: bool = False,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention probability each key receives, summed over queries and its group's query heads.

    Returns [B, Hkv, Tk] fp32; a second, key-major pass that reuses `lse` (from
    `attention_entropy`; computed first when not given). With `normalize`, each key's sum is
    divided by the number of (query, query head) pairs that can see it: the mean probability it
    receives, which removes the causal bias toward early keys (H2O's raw column sum favours them).
    `bias` and `softcap` as in `attention_entropy`; with a bias, the pairs counted are those it keeps.
    A given `lse` defines each row's normaliser (an attention sink's logit can be folded into it).
    """
    reference.check_attention_args(q, k, causal=causal, window=window)
    scale = reference.default_scale(q.shape[-1]) if scale is None else float(scale)
    softcap = float(softcap) if softcap else None
    if lse is not None and lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if backend_for(q) != "triton":
        return reference.attention_mass(q, k, scale=scale, causal=causal, window=window, normalize=normalize,
                                        lse=lse, bias=bias, softcap=softcap)
    tri = _attn_module()
    q, k = _for_triton(q, k)
    if lse is None:
        lse = tri.attention_entropy(q, k, scale, causal, window, bias=bias, softcap=softcap)[1]
    mass = tri.attention_mass(q, k, lse, scale, causal, window, bias=bias, softcap=softcap)
    if normalize:
        group = q.shape[1] // k.shape[1]
        if bias is None:
            mass = reference.normalize_mass(mass, group, q.shape[2], causal=causal, window=window)
        else:
            count = reference.visible_pairs(q.shape[1], k.shape[1], q.shape[2], k.shape[2], causal=causal,
                                            window=window, bias=bias)
            mass = torch.where(count > 0, mass / count.clamp(min=1).to(mass.dtype), torch.zeros_like(mass))
    return mass


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of x [T, R] in fp32 (a tiled reduction over T on the Triton path)."""
    if x.dim() != 2:
        raise ValueError(f"x must have 2 dimensions [T, R], got shape {tuple(x.shape)}")
    if backend_for(x) == "triton":
        return _triton_module().gram(*_for_triton(x))
    return reference.gram(x)


def latent_effective_rank(x: torch.Tensor) -> float:
    """Roy–Vetterli effective rank of a latent matrix x [T, R]: exp of the entropy of σ/Σσ.

    Only the R x R Gram matrix is formed, accumulated in float64 on the device (an fp32 Gram's
    rounding noise, about 1e-7 of the largest eigenvalue in each of R directions, reads as
    extra rank: 1.12 for a rank-1 latent of width 512); its eigenvalues σ² come from a float64
    symmetric eigen-solve on the CPU. Between 1 and min(T, R); 0 for an all-zero matrix.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have 2 dimensions [T, R], got shape {tuple(x.shape)}")
    xd = x.detach().double() if x.device.type != "mps" else x.detach().cpu().double()
    g = xd.T @ xd
    eig = torch.linalg.eigvalsh(g.to("cpu")).numpy()
    return erank_from_eigenvalues(eig)
