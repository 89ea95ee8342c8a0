"""Triton kernels and their launchers. Imported lazily: `import kvscope.kernels` needs no Triton.

Whether the kernels run compiled or in Triton's interpreter is fixed when this module is first
imported (Triton reads ``TRITON_INTERPRET`` as it decorates them). Math: ``docs/kernels.md``.
Logits are handled in base 2 (exp2/log2 are the fast instructions): s2 = s·log2(e), and the
running sums convert back to nats at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch parameters of the entropy and mass kernels."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return type(_head_norms_kernel).__name__ == "InterpretedFunction"


def default_config(device: torch.device) -> AttnConfig:
    if device.type != "cuda":  # interpreter: small tiles keep NumPy fast and exercise block edges
        return AttnConfig(16, 16, 1, 1)
    return AttnConfig(128, 64, 8, 3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~3e-4 relative); 16-bit: native.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------
# Per-token norms: rows of D elements, BLOCK_R rows a program, fp32 sums of squares.


@triton.jit
def _head_norms_kernel(x_ptr, out_ptr, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, tl.sqrt(tl.sum(x * x, axis=1)), mask=rows < n_rows)


def head_norms(x: torch.Tensor, *, block_bytes: int = 16384, num_warps: int = 4) -> torch.Tensor:
    b, h, t, d = x.shape
    flat = x.reshape(-1, d)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    if flat.shape[0] == 0:
        return out.reshape(b, h, t)
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(triton.next_power_of_2(flat.shape[0]), block_bytes // (block_d * x.element_size())))
    if interpreting():
        block_r = min(block_r, 64)
    grid = (triton.cdiv(flat.shape[0], block_r),)
    _head_norms_kernel[grid](flat, out, flat.shape[0], d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return out.reshape(b, h, t)


# ----------------------------------------------------------------------------------------------
# Entropy: one program per (query block, batch x query head, key split); streaming (m, l, t).


@triton.jit
def _entropy_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr, t_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    Hq, GROUP, Tq, Tk, D, qk_scale, WINDOW, SPLIT_LEN,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    off = Tk - Tq  # query i sits at key position i + off
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    pos = offs_m + off
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, Tk)
    if CAUSAL:
        hi = tl.minimum(hi, pid_m * BLOCK_M + BLOCK_M + off)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(pid_m * BLOCK_M + off - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                    mask=(cols[:, None] < hi) & (offs_d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        keep = (cols[None, :] < hi) & (offs_m[:, None] < Tq)
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
        if HAS_WINDOW:
            keep = keep & (cols[None, :] > pos[:, None] - WINDOW)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        d = tl.where(keep, s - m_safe[:, None], 0.0)
        shift = (tl.where(l_i > 0, m_i, m_safe) - m_safe) * l_i  # 0 while the row is empty
        t_i = alpha * (t_i + shift) + tl.sum(p * d, axis=1)
        l_i = alpha * l_i + tl.sum(p, axis=1)
        m_i = m_new
    out = split.to(tl.int64) * (tl.num_programs(1) * Tq) + bh.to(tl.int64) * Tq + offs_m
    tl.store(m_ptr + out, m_i, mask=offs_m < Tq)
    tl.store(l_ptr + out, l_i, mask=offs_m < Tq)
    tl.store(t_ptr + out, t_i, mask=offs_m < Tq)


def _num_splits(q_blocks: int, k_blocks: int, device: torch.device) -> int:
    """Split the key range when query blocks alone would leave SMs idle (decode-style shapes)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * sms / max(q_blocks, 1))
    return max(1, min(want, k_blocks // 4))


def attention_entropy(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, window: int | None,
    config: AttnConfig | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = config or default_config(q.device)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    m_blocks = triton.cdiv(tq, cfg.block_m)
    k_blocks = max(1, triton.cdiv(tk, cfg.block_n))
    n_split = splits or _num_splits(m_blocks * b * hq, k_blocks, q.device)
    split_len = triton.cdiv(k_blocks, n_split) * cfg.block_n
    n_split = max(1, triton.cdiv(tk, split_len))
    shape = (n_split, b, hq, tq)
    m = torch.empty(shape, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    t_sum = torch.empty_like(m)
    if q.numel() and tq:
        grid = (m_blocks, b * hq, n_split)
        _entropy_kernel[grid](
            q, k, m, l_sum, t_sum, *q.stride(), *k.stride(), hq, hq // hkv, tq, tk, d, scale * LOG2E,
            window or 0, split_len, CAUSAL=causal, HAS_WINDOW=window is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return finish_entropy(m, l_sum, t_sum)


def finish_entropy(m: torch.Tensor, l_sum: torch.Tensor, t_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge base-2 partial sums of key splits (dim 0) and return (entropy, lse) in nats."""
    if m.shape[0] > 1:
        mx = m.amax(dim=0)
        mx_safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
        w = torch.exp2(m - mx_safe)  # -inf partials weigh 0
        shift = (torch.where(l_sum > 0, m, mx_safe) - mx_safe) * l_sum
        t_all = (w * (t_sum + shift)).sum(dim=0)
        l_all = (w * l_sum).sum(dim=0)
        m_all = mx
    else:
        m_all, l_all, t_all = m[0], l_sum[0], t_sum[0]
    seen = l_all > 0
    l_safe = torch.where(seen, l_all, torch.ones_like(l_all))
    entropy = torch.where(seen, torch.log(l_safe) - LN2 * t_all / l_safe, torch.zeros_like(l_all)).clamp_(min=0.0)
    lse = torch.where(seen, (m_all + torch.log2(l_safe)) * LN2, torch.full_like(l_all, float("-inf")))
    return entropy, lse


# ----------------------------------------------------------------------------------------------
# Mass: one program per (key block, batch x kv head); loops over the group's query heads and the
# query blocks that can see the block, p = exp2(s2 - lse2), column sums kept in registers.


@triton.jit
def _mass_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    Hq, Hkv, GROUP, Tq, Tk, D, qk_scale, WINDOW,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    off = Tk - Tq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
    lo = 0
    hi = Tq
    if CAUSAL:  # query i sees key j when i + off >= j
        lo = (tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:  # ... and i + off - WINDOW < j
        hi = tl.minimum(hi, tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - off + WINDOW, 0))
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        lse_base = lse_ptr + (b.to(tl.int64) * Hq + h) * Tq
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=(rows[:, None] < hi) & (offs_d[None, :] < D), other=0.0)
            lse2 = tl.load(lse_base + rows, mask=rows < hi, other=0.0)
            s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            keep = (rows[None, :] < hi) & (offs_n[:, None] < Tk) & (lse2[None, :] > float("-inf"))
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + off)
            if HAS_WINDOW:
                keep = keep & (offs_n[:, None] > rows[None, :] + off - WINDOW)
            p = tl.where(keep, tl.exp2(s - lse2[None, :]), 0.0)
            acc += tl.sum(p, axis=1)
    tl.store(out_ptr + bh.to(tl.int64) * Tk + offs_n, acc, mask=offs_n < Tk)


def attention_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool, window: int | None,
    config: AttnConfig | None = None,
) -> torch.Tensor:
    cfg = config or default_config(q.device)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty((b, hkv, tk), dtype=torch.float32, device=q.device)
    if not out.numel():
        return out
    if tq == 0:
        return out.zero_()
    lse2 = (lse.float() * LOG2E).contiguous()
    grid = (triton.cdiv(tk, cfg.block_n), b * hkv)
    _mass_kernel[grid](
        q, k, lse2, out, *q.stride(), *k.stride(), hq, hkv, hq // hkv, tq, tk, d, scale * LOG2E, window or 0,
        CAUSAL=causal, HAS_WINDOW=window is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Gram matrix XᵀX of x [T, R]: one program per (R-tile, R-tile), looping over T.


@triton.jit
def _gram_kernel(x_ptr, out_ptr, T, R, sxt, sxr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    ri = pid_i * BLOCK_R + tl.arange(0, BLOCK_R)
    rj = pid_j * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_R, BLOCK_R], tl.float32)
    for start in range(0, T, BLOCK_T):
        t = start + offs_t
        a = tl.load(x_ptr + t[:, None] * sxt + ri[None, :] * sxr, mask=(t[:, None] < T) & (ri[None, :] < R), other=0.0)
        c = tl.load(x_ptr + t[:, None] * sxt + rj[None, :] * sxr, mask=(t[:, None] < T) & (rj[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(a), c, input_precision=PRECISION)
    tl.store(out_ptr + ri[:, None] * R + rj[None, :], acc, mask=(ri[:, None] < R) & (rj[None, :] < R))


def gram(x: torch.Tensor) -> torch.Tensor:
    t, r = x.shape
    out = torch.empty((r, r), dtype=torch.float32, device=x.device)
    if r == 0:
        return out
    if t == 0:
        return out.zero_()
    block_r = 16 if interpreting() else 64
    block_t = 16 if interpreting() else 64
    grid = (triton.cdiv(r, block_r), triton.cdiv(r, block_r))
    _gram_kernel[grid](x, out, t, r, *x.stride(), BLOCK_R=block_r, BLOCK_T=block_t, PRECISION=_precision(x.dtype))
    return out
