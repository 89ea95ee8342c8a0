"""Triton kernels for norms and the Gram matrix, and launch settings; attention is `_triton_attn`.

Imported lazily: `import kvscope.kernels` needs no Triton. Whether the kernels run compiled or in
Triton's interpreter is fixed when this module is first imported (Triton reads
``TRITON_INTERPRET`` as it decorates them). Math: ``docs/kernels.md``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class AttnConfig:
    """Tile shape and launch parameters of the entropy and mass kernels."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return type(_head_norms_kernel).__name__ == "InterpretedFunction"


# Triton's per-block shared memory when the device cannot be asked (H100/H200: 227 KiB opt-in).
FALLBACK_SHARED_MEMORY = 232_448


@functools.lru_cache(maxsize=16)
def shared_memory_limit(index: int) -> int:
    """Bytes of shared memory one block may use on CUDA device `index` (the opt-in maximum)."""
    props = torch.cuda.get_device_properties(index)
    for name in ("shared_memory_per_block_optin", "max_shared_memory_per_block_optin"):
        value = getattr(props, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_SHARED_MEMORY


def tile_shared_bytes(cfg: AttnConfig, head_dim: int, element_size: int) -> int:
    """Shared memory a launch needs, estimated as Triton lays it out: the resident tile (the query
    block in the entropy kernel, the key block in the mass kernel) plus `num_stages` buffers of the
    streamed tile, each BLOCK_D wide, with a 25% margin for layout padding and conversions."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    resident, streamed = cfg.block_m, cfg.block_n
    tiles = resident * block_d + cfg.num_stages * streamed * block_d
    return int(tiles * max(element_size, 2) * 1.25)


def fit_config(cfg: AttnConfig, head_dim: int, element_size: int, limit: int, *, stream_rows: str) -> AttnConfig:
    """Shrink a tile shape until it fits `limit` bytes of shared memory: first fewer pipeline
    stages, then a narrower streamed block, then a narrower resident block (head_dim 512 in fp32
    ends at 32 x 16 with 1 stage, about 100 KiB)."""

    def need(c: AttnConfig) -> int:
        if stream_rows == "n":
            return tile_shared_bytes(c, head_dim, element_size)
        return tile_shared_bytes(AttnConfig(c.block_n, c.block_m, c.num_warps, c.num_stages), head_dim, element_size)

    while need(cfg) > limit:
        if cfg.num_stages > 1:
            cfg = AttnConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
        elif stream_rows == "n" and cfg.block_n > 16:
            cfg = AttnConfig(cfg.block_m, cfg.block_n // 2, cfg.num_warps, cfg.num_stages)
        elif stream_rows == "m" and cfg.block_m > 16:
            cfg = AttnConfig(cfg.block_m // 2, cfg.block_n, cfg.num_warps, cfg.num_stages)
        elif cfg.block_m > 16 and stream_rows == "n":
            cfg = AttnConfig(cfg.block_m // 2, cfg.block_n, max(1, cfg.num_warps // 2), cfg.num_stages)
        elif cfg.block_n > 16 and stream_rows == "m":
            cfg = AttnConfig(cfg.block_m, cfg.block_n // 2, max(1, cfg.num_warps // 2), cfg.num_stages)
        else:
            break
    return cfg


def _limit(device: torch.device) -> int:
    return shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


def default_config(device: torch.device, head_dim: int = 128, element_size: int = 2) -> AttnConfig:
    """Entropy kernel tiles: the query block stays resident, key blocks stream through."""
    if device.type != "cuda":  # interpreter: small tiles keep NumPy fast and exercise block edges
        return AttnConfig(16, 16, 1, 1)
    return fit_config(AttnConfig(128, 64, 8, 3), head_dim, element_size, _limit(device), stream_rows="n")


def default_mass_config(device: torch.device, head_dim: int = 128, element_size: int = 2) -> AttnConfig:
    """Mass kernel tiles: the key block stays resident, query blocks stream through."""
    if device.type != "cuda":
        return AttnConfig(16, 16, 1, 1)
    # H100 sweep at 16k keys: 3.6 ms against 4.4 ms with 8 warps
    return fit_config(AttnConfig(128, 64, 4, 3), head_dim, element_size, _limit(device), stream_rows="m")


def precision(dtype: torch.dtype) -> str:
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
    _gram_kernel[grid](x, out, t, r, *x.stride(), BLOCK_R=block_r, BLOCK_T=block_t, PRECISION=precision(x.dtype))
    return out
