"""Triton kernels for attention entropy (streaming, query-major) and key mass (key-major).

Logits are handled in base 2 (exp2/log2 are the fast instructions): s2 = s·log2(e), and the
running sums convert back to nats at the end. Each program walks its key (or query) range in
three stretches: masked blocks at the edges, unmasked blocks in between (no mask arithmetic).
Math and conventions: ``docs/kernels.md``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kvscope.kernels._triton import (
    AttnConfig,
    default_config,
    default_mass_config,
    fit_config,
    precision,
    tile_shared_bytes,
)

LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # for the kernels
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _logits2(dot, qk_scale, scale, SOFTCAP, HAS_SOFTCAP: tl.constexpr):
    """Logits in base-2 units: q·k·scale, or with a softcap c: c·tanh(q·k·scale / c) (Gemma 2)."""
    if HAS_SOFTCAP:
        x = dot * scale / SOFTCAP
        return (SOFTCAP * (2.0 * tl.sigmoid(2.0 * x) - 1.0)) * _LOG2E
    return dot * qk_scale


@triton.jit
def _entropy_loop(m_i, l_i, t_i, q, k_base, skn, skd, start, end, hi, pos, offs_m, offs_n, offs_d, qk_scale, WINDOW,
                  bias_base, sbq, sbk, Tq, scale, SOFTCAP,
                  HEAD_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                        mask=(cols[:, None] < hi) & (offs_d[None, :] < HEAD_D), other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=offs_d[None, :] < HEAD_D,
                        other=0.0)
        s = _logits2(tl.dot(q, tl.trans(k), input_precision=PRECISION), qk_scale, scale, SOFTCAP, HAS_SOFTCAP)
        if HAS_BIAS:  # the model's own mask, in nats: -inf drops a key (padding, windows, chunks)
            bias = tl.load(bias_base + offs_m[:, None] * sbq + cols[None, :] * sbk,
                           mask=(offs_m[:, None] < Tq) & (cols[None, :] < hi), other=float("-inf"))
            s = s + bias * _LOG2E
        if MASKED:
            keep = cols[None, :] < hi
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None])
            if HAS_WINDOW:
                keep = keep & (cols[None, :] > pos[:, None] - WINDOW)
            if HAS_BIAS:
                keep = keep & (s > float("-inf"))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        if MASKED:
            d = tl.where(keep, s - m_safe[:, None], 0.0)  # masked: 0, never 0 * -inf
        else:
            d = s - m_safe[:, None]
        shift = (tl.where(l_i > 0, m_i, m_safe) - m_safe) * l_i  # 0 while the row is empty
        t_i = alpha * (t_i + shift) + tl.sum(p * d, axis=1)
        l_i = alpha * l_i + tl.sum(p, axis=1)
        m_i = m_new
    return m_i, l_i, t_i


@triton.jit
def _entropy_kernel(
    q_ptr, k_ptr, ent_ptr, lse_ptr, m_ptr, l_ptr, t_ptr, bias_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, sbb, sbh, sbq, sbk,
    Hq, GROUP, Tq, Tk, qk_scale, scale, SOFTCAP, WINDOW, SPLIT_LEN,
    HEAD_D: tl.constexpr, SPLIT: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    off = Tk - Tq  # query i sits at key position i + off
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_D), other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + (h // GROUP).to(tl.int64) * skh
    bias_base = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    pos = offs_m + off
    first = pid_m * BLOCK_M + off  # key position of the block's first query
    # Keys some row sees: [lo, hi); keys every row sees: [full_lo, full_hi). Block-aligned stretches.
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, Tk)
    full_lo = lo
    full_hi = hi
    if CAUSAL:
        hi = tl.minimum(hi, first + BLOCK_M)
        full_hi = tl.minimum(hi, first + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (tl.maximum(first - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N)
        full_lo = tl.maximum(lo, first + BLOCK_M - WINDOW)
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo), tl.maximum(hi, lo))
    z = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), a)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    m_i, l_i, t_i = _entropy_loop(m_i, l_i, t_i, q, k_base, skn, skd, lo, a, hi, pos, offs_m, offs_n, offs_d, qk_scale,
                                  WINDOW, bias_base, sbq, sbk, Tq, scale, SOFTCAP, HEAD_D, True, CAUSAL, HAS_WINDOW,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, PRECISION)
    m_i, l_i, t_i = _entropy_loop(m_i, l_i, t_i, q, k_base, skn, skd, a, z, hi, pos, offs_m, offs_n, offs_d, qk_scale,
                                  WINDOW, bias_base, sbq, sbk, Tq, scale, SOFTCAP, HEAD_D, HAS_BIAS, CAUSAL, HAS_WINDOW,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, PRECISION)
    m_i, l_i, t_i = _entropy_loop(m_i, l_i, t_i, q, k_base, skn, skd, z, hi, hi, pos, offs_m, offs_n, offs_d, qk_scale,
                                  WINDOW, bias_base, sbq, sbk, Tq, scale, SOFTCAP, HEAD_D, True, CAUSAL, HAS_WINDOW,
                                  HAS_BIAS, HAS_SOFTCAP, BLOCK_N, PRECISION)
    row_ok = offs_m < Tq
    if SPLIT:
        out = split.to(tl.int64) * (tl.num_programs(1) * Tq) + bh.to(tl.int64) * Tq + offs_m
        tl.store(m_ptr + out, m_i, mask=row_ok)
        tl.store(l_ptr + out, l_i, mask=row_ok)
        tl.store(t_ptr + out, t_i, mask=row_ok)
    else:
        out = bh.to(tl.int64) * Tq + offs_m
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        ent = tl.maximum(tl.where(seen, tl.log(l_safe) - _LN2 * t_i / l_safe, 0.0), 0.0)
        tl.store(ent_ptr + out, ent, mask=row_ok)
        tl.store(lse_ptr + out, tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf")), mask=row_ok)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, t_ptr, ent_ptr, lse_ptr, N, SPLITS, BLOCK: tl.constexpr):
    """Merge the key splits' (m, l, t): m = max m_i, l = Σ e^(m_i−m) l_i, t likewise (see docs)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(0, SPLITS):
        mx = tl.maximum(mx, tl.load(m_ptr + s * N + offs, mask=ok, other=float("-inf")))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    l_all = tl.zeros([BLOCK], tl.float32)
    t_all = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLITS):
        m = tl.load(m_ptr + s * N + offs, mask=ok, other=float("-inf"))
        ls = tl.load(l_ptr + s * N + offs, mask=ok, other=0.0)
        ts = tl.load(t_ptr + s * N + offs, mask=ok, other=0.0)
        w = tl.exp2(m - mx_safe)
        l_all += w * ls
        t_all += w * (ts + (tl.where(ls > 0, m, mx_safe) - mx_safe) * ls)
    seen = l_all > 0
    l_safe = tl.where(seen, l_all, 1.0)
    tl.store(ent_ptr + offs, tl.maximum(tl.where(seen, tl.log(l_safe) - _LN2 * t_all / l_safe, 0.0), 0.0), mask=ok)
    tl.store(lse_ptr + offs, tl.where(seen, (mx + tl.log2(l_safe)) * _LN2, float("-inf")), mask=ok)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(q_programs: int, k_blocks: int, device: torch.device) -> int:
    """Split the key range when query blocks alone would leave SMs idle (decode-style shapes)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = triton.cdiv(2 * sms, max(q_programs, 1))
    return max(1, min(want, k_blocks // 4))


# Tile shapes that failed to launch for want of shared memory are shrunk and retried; the shape that
# worked is kept per (kernel, device, head_dim, element size), so the retry happens once.
_WORKING: dict[tuple[str, str, int, int], AttnConfig] = {}
_MAX_RETRIES = 8


def _launch(kind: str, q: torch.Tensor, cfg: AttnConfig | None, default: AttnConfig, launch: Any) -> None:
    """Run `launch(cfg)`, shrinking the tiles while Triton reports too little shared memory."""
    if cfg is not None:
        launch(cfg)
        return
    key = (kind, str(q.device), q.shape[-1], q.element_size())
    cfg = _WORKING.get(key, default)
    for _ in range(_MAX_RETRIES):
        try:
            launch(cfg)
        except OutOfResources:
            rows = "n" if kind == "entropy" else "m"
            need = tile_shared_bytes(cfg if rows == "n" else AttnConfig(cfg.block_n, cfg.block_m, 1, cfg.num_stages),
                                     q.shape[-1], q.element_size())
            smaller = fit_config(cfg, q.shape[-1], q.element_size(), need - 1, stream_rows=rows)
            if smaller == cfg:
                raise
            cfg = smaller
            continue
        _WORKING[key] = cfg
        return
    raise OutOfResources(0, 0, "shared memory")  # pragma: no cover - 8 halvings reach the smallest tile first


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The bias tensor [B, H or 1, Tq, Tk] (fp32) and its strides, head stride 0 when broadcast."""
    if bias is None:
        return q, (0, 0, 0, 0)  # any pointer: HAS_BIAS=False never reads it
    sb, sh, sq, sk = bias.stride()
    return bias, (sb, sh if bias.shape[1] > 1 else 0, sq, sk)


def attention_entropy(
    q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, window: int | None,
    config: AttnConfig | None = None, splits: int | None = None, bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    entropy = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(entropy)
    if not entropy.numel():
        return entropy, lse
    bias_t, bias_strides = _bias_args(bias, q)

    def launch(cfg: AttnConfig) -> None:
        m_blocks = triton.cdiv(tq, cfg.block_m)
        k_blocks = max(1, triton.cdiv(tk, cfg.block_n))
        n_split = splits or _num_splits(m_blocks * b * hq, k_blocks, q.device)
        split_len = triton.cdiv(k_blocks, n_split) * cfg.block_n
        n_split = max(1, triton.cdiv(tk, split_len))
        partial = torch.empty((3, n_split, b, hq, tq) if n_split > 1 else (3, 1), dtype=torch.float32,
                              device=q.device)
        _entropy_kernel[(m_blocks, b * hq, n_split)](
            q, k, entropy, lse, partial[0], partial[1], partial[2], bias_t, *q.stride(), *k.stride(), *bias_strides,
            hq, hq // hkv, tq, tk, scale * LOG2E, scale, float(softcap or 1.0), window or 0, split_len, HEAD_D=d,
            SPLIT=n_split > 1, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=bool(softcap), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if n_split > 1:
            n = entropy.numel()
            _merge_kernel[(triton.cdiv(n, 1024),)](partial[0], partial[1], partial[2], entropy, lse, n, n_split,
                                                   BLOCK=1024)

    _launch("entropy", q, config, default_config(q.device, d, q.element_size()), launch)
    return entropy, lse


@triton.jit
def _mass_loop(acc, k, q_base, sqm, sqd, lse_base, start, end, hi, offs_n, offs_m, offs_d, off, qk_scale, WINDOW,
               bias_base, sbq, sbk, Tk, scale, SOFTCAP,
               HEAD_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if MASKED:
            q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=(rows[:, None] < hi) & (offs_d[None, :] < HEAD_D), other=0.0)
            lse2 = tl.load(lse_base + rows, mask=rows < hi, other=float("-inf")) * _LOG2E
        else:
            q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :] * sqd, mask=offs_d[None, :] < HEAD_D, other=0.0)
            lse2 = tl.load(lse_base + rows) * _LOG2E
        s = _logits2(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale, scale, SOFTCAP,
                     HAS_SOFTCAP)  # [BLOCK_N, BLOCK_M]
        if HAS_BIAS:
            bias = tl.load(bias_base + rows[None, :] * sbq + offs_n[:, None] * sbk,
                           mask=(rows[None, :] < hi) & (offs_n[:, None] < Tk), other=float("-inf"))
            s = s + bias * _LOG2E
        if MASKED:
            keep = (rows[None, :] < hi) & (lse2[None, :] > float("-inf"))
            if HAS_BIAS:
                keep = keep & (s > float("-inf"))
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + off)
            if HAS_WINDOW:
                keep = keep & (offs_n[:, None] > rows[None, :] + off - WINDOW)
            p = tl.where(keep, tl.exp2(s - lse2[None, :]), 0.0)
        else:
            p = tl.exp2(s - lse2[None, :])
        acc += tl.sum(p, axis=1)
    return acc


@triton.jit
def _mass_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, bias_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, sbb, sbh, sbq, sbk,
    Hq, Hkv, GROUP, Tq, Tk, qk_scale, scale, SOFTCAP, WINDOW,
    HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    off = Tk - Tq
    first = pid_n * BLOCK_N  # the block's first key
    offs_n = first + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < HEAD_D), other=0.0)
    # Queries that see some key of the block: [lo, hi); that see every key: [full_lo, full_hi).
    lo = 0
    hi = Tq
    full_lo = 0
    full_hi = Tq
    if CAUSAL:  # query i sees key j when i + off >= j
        lo = (tl.maximum(first - off, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(first + BLOCK_N - 1 - off, 0)
    if HAS_WINDOW:  # ... and i + off - WINDOW < j
        hi = tl.minimum(hi, tl.maximum(first + BLOCK_N - 1 - off + WINDOW, 0))
        full_hi = tl.minimum(hi, tl.maximum(first - off + WINDOW, 0))
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo), tl.maximum(hi, lo))
    z = tl.maximum(tl.minimum((full_hi // BLOCK_M) * BLOCK_M, hi), a)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        lse_base = lse_ptr + (b.to(tl.int64) * Hq + h) * Tq
        bias_base = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
        acc = _mass_loop(acc, k, q_base, sqm, sqd, lse_base, lo, a, hi, offs_n, offs_m, offs_d, off, qk_scale,
                         WINDOW, bias_base, sbq, sbk, Tk, scale, SOFTCAP, HEAD_D, True, CAUSAL, HAS_WINDOW, HAS_BIAS,
                         HAS_SOFTCAP, BLOCK_M, PRECISION)
        acc = _mass_loop(acc, k, q_base, sqm, sqd, lse_base, a, z, hi, offs_n, offs_m, offs_d, off, qk_scale,
                         WINDOW, bias_base, sbq, sbk, Tk, scale, SOFTCAP, HEAD_D, HAS_BIAS, CAUSAL, HAS_WINDOW, HAS_BIAS,
                         HAS_SOFTCAP, BLOCK_M, PRECISION)
        acc = _mass_loop(acc, k, q_base, sqm, sqd, lse_base, z, hi, hi, offs_n, offs_m, offs_d, off, qk_scale,
                         WINDOW, bias_base, sbq, sbk, Tk, scale, SOFTCAP, HEAD_D, True, CAUSAL, HAS_WINDOW, HAS_BIAS,
                         HAS_SOFTCAP, BLOCK_M, PRECISION)
    tl.store(out_ptr + bh.to(tl.int64) * Tk + offs_n, acc, mask=offs_n < Tk)


def attention_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool, window: int | None,
    config: AttnConfig | None = None, bias: torch.Tensor | None = None, softcap: float | None = None,
) -> torch.Tensor:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty((b, hkv, tk), dtype=torch.float32, device=q.device)
    if not out.numel():
        return out
    if tq == 0:
        return out.zero_()
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = lse.float().contiguous()
    bias_t, bias_strides = _bias_args(bias, q)

    def launch(cfg: AttnConfig) -> None:
        _mass_kernel[(triton.cdiv(tk, cfg.block_n), b * hkv)](
            q, k, lse, out, bias_t, *q.stride(), *k.stride(), *bias_strides, hq, hkv, hq // hkv, tq, tk,
            scale * LOG2E, scale, float(softcap or 1.0), window or 0, HEAD_D=d, CAUSAL=causal,
            HAS_WINDOW=window is not None, HAS_BIAS=bias is not None, HAS_SOFTCAP=bool(softcap),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
            PRECISION=precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    _launch("mass", q, config, default_mass_config(q.device, d, q.element_size()), launch)
    return out
