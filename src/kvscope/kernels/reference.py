"""PyTorch reference implementations of the analysis kernels.

They define what the Triton kernels compute and run wherever Triton does not (CPU tensors without
the interpreter). They materialise the Tq x Tk logits, so they are for tests, small samples and
CPU fallbacks, not for long contexts. All arithmetic is fp32 (or wider).
"""

from __future__ import annotations

import math

import torch


def head_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms of x [B, H, T, D] → [B, H, T] fp32."""
    _check_rank(x, 4, "x")
    return torch.linalg.vector_norm(x.float(), dim=-1)


def visibility_mask(tq: int, tk: int, *, causal: bool, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [Tq, Tk] mask of the keys each query sees, queries aligned to the end of the keys.

    Query i sits at key position i + Tk - Tq; causal keeps keys j <= that position, a sliding
    window W also drops keys j <= position - W (Hugging Face's convention).
    """
    pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= pos
    if window is not None:
        mask &= j > pos - window
    return mask


def visible_queries(tq: int, tk: int, *, causal: bool, window: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Number of queries that can see each key, [Tk] int64 (computed without a Tq x Tk mask)."""
    off = tk - tq
    j = torch.arange(tk, device=device)
    lo = torch.clamp(j - off, min=0) if causal else torch.zeros_like(j)
    hi = torch.clamp(j - off + window - 1, max=tq - 1) if window is not None else torch.full_like(j, tq - 1)
    return torch.clamp(hi - lo + 1, min=0)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float | None, causal: bool, window: int | None,
            bias: torch.Tensor | None = None, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked fp32 logits [B, Hq, Tq, Tk] (masked entries -inf) and the mask [B, Hq or 1, Tq, Tk].

    As the models compute them: q·k·scale, then a softcap c·tanh(x / c) when given, then the
    additive `bias` (the model's mask: 0 kept, -inf dropped, any other value added).
    """
    check_attention_args(q, k, causal=causal, window=window)
    group = q.shape[1] // k.shape[1]
    scale = default_scale(q.shape[-1]) if scale is None else scale
    # float64 on the CPU (tests, small samples: rounding-free), fp32 on a GPU without Triton
    wide = torch.float64 if q.dtype == torch.float64 or q.device.type == "cpu" else torch.float32
    kf = k.to(wide).repeat_interleave(group, dim=1)
    s = torch.matmul(q.to(wide), kf.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visibility_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device)[None, None]
    if bias is not None:
        s = s + bias.to(wide)
        mask = mask & torch.isfinite(bias)
    return s.masked_fill(~mask, float("-inf")), mask


def attention_entropy(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = True, window: int | None = None,
    bias: torch.Tensor | None = None, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats) and log-sum-exp of each query row's attention distribution, [B, Hq, Tq] each.

    A row that sees no key has entropy 0 and LSE -inf.
    """
    s, mask = _logits(q, k, scale, causal, window, bias, softcap)
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    logp = s - torch.where(finite, lse, torch.zeros_like(lse))[..., None]
    p = torch.exp(logp)
    plogp = torch.where(mask, p * torch.where(mask, logp, torch.zeros_like(logp)), torch.zeros_like(p))
    entropy = torch.clamp(-plogp.sum(dim=-1), min=0.0)
    out = torch.where(finite, entropy, torch.zeros_like(entropy)), lse
    return (out[0].float(), out[1].float()) if q.dtype != torch.float64 else out  # fp32 out, as the kernels


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
    """Attention probability each key receives, summed over queries and the group's query heads.

    Returns [B, Hkv, Tk] fp32. With `normalize`, each key's mass is divided by the number of
    (query, query head) pairs that can see it: the mean probability it gets, free of the causal
    bias toward early keys (0 for keys no query sees). A given `lse` [B, Hq, Tq] replaces each
    row's own log-sum-exp (attention sinks add to the denominator).
    """
    s, _ = _logits(q, k, scale, causal, window, bias, softcap)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see no key are all -inf: NaN → 0
    if lse is not None:  # a given LSE (e.g. with attention sinks in the denominator) defines the rows
        p = torch.exp(s - lse.float()[..., None]).nan_to_num(0.0)
    b, hq, tq, tk = p.shape
    hkv = k.shape[1]
    mass = p.sum(dim=2).reshape(b, hkv, hq // hkv, tk).sum(dim=2)
    if normalize:
        if bias is None:
            mass = normalize_mass(mass, hq // hkv, tq, causal=causal, window=window)
        else:
            count = visible_pairs(q.shape[1], k.shape[1], tq, tk, causal=causal, window=window, bias=bias)
            mass = torch.where(count > 0, mass / count.clamp(min=1).to(mass.dtype), torch.zeros_like(mass))
    return mass if q.dtype == torch.float64 else mass.float()


def visible_pairs(hq: int, hkv: int, tq: int, tk: int, *, causal: bool, window: int | None,
                  bias: torch.Tensor) -> torch.Tensor:
    """(query, query head) pairs that see each key under a mask `bias` [B, 1 or Hq, Tq, Tk]: [B, Hkv, Tk]."""
    vis = visibility_mask(tq, tk, causal=causal, window=window, device=bias.device)[None, None] & torch.isfinite(bias)
    count = vis.sum(dim=2)  # [B, 1 or Hq, Tk]
    b = count.shape[0]
    if count.shape[1] == 1:
        return count.expand(b, hkv, tk) * (hq // hkv)
    return count.reshape(b, hkv, hq // hkv, tk).sum(dim=2)


def normalize_mass(mass: torch.Tensor, group: int, tq: int, *, causal: bool, window: int | None) -> torch.Tensor:
    """Divide summed key mass [B, Hkv, Tk] by the (query, head) pairs that see each key."""
    count = visible_queries(tq, mass.shape[-1], causal=causal, window=window, device=mass.device) * group
    return torch.where(count > 0, mass / count.clamp(min=1).to(mass.dtype), torch.zeros_like(mass))


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of x [T, R] accumulated in float64 (an fp32 Gram's rounding noise reads as extra rank)."""
    _check_rank(x, 2, "x")
    xf = x.double()
    return xf.T @ xf


def erank_from_gram(g: torch.Tensor) -> float:
    """Roy–Vetterli effective rank from a Gram matrix XᵀX (its eigenvalues are σ²)."""
    eig = torch.linalg.eigvalsh(g.detach().to("cpu", torch.float64))
    sigma = torch.sqrt(torch.clamp(eig, min=0.0))
    total = float(sigma.sum())
    if total <= 0.0 or not math.isfinite(total):
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def latent_effective_rank(x: torch.Tensor) -> float:
    """Roy–Vetterli effective rank of x [T, R] (exp of the entropy of normalised singular values)."""
    return erank_from_gram(gram(x))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def check_attention_args(q: torch.Tensor, k: torch.Tensor, *, causal: bool, window: int | None) -> None:
    """Raise ValueError unless q [B, Hq, Tq, D] and k [B, Hkv, Tk, D] fit together."""
    _check_rank(q, 4, "q")
    _check_rank(k, 4, "k")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dimension")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"a sliding window needs causal=True and window >= 1 (got window={window}, causal={causal})")


def _check_rank(x: torch.Tensor, rank: int, name: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
