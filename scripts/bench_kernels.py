"""Check, then time the kvscope kernels on a GPU against copies, SDPA and materialised softmax.

Usage (on a CUDA machine): ``PYTHONPATH=src python3 scripts/bench_kernels.py [--out DIR]``.
``--smoke`` runs every step at toy sizes on the CPU through Triton's interpreter (no timing
meaning), to catch mistakes before spending GPU time. Correctness is checked on fresh random data
first; timings are medians of ``triton.testing.do_bench``; peak memory is the allocator's peak
above what the inputs hold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvscope import kernels as K  # noqa: E402
from kvscope.kernels import _triton as T  # noqa: E402
from kvscope.kernels import _triton_attn as A  # noqa: E402
from kvscope.kernels import reference as R  # noqa: E402

DEV = torch.device("cpu" if SMOKE else "cuda")
LOW = torch.float16 if SMOKE else torch.bfloat16  # the interpreter has no bfloat16
MATERIALISED_LIMIT = 40 * 2**30  # bytes of logits+probabilities the materialised baseline may hold


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of fn."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def peak_bytes(fn: Callable[[], Any]) -> int | None:
    if SMOKE:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite):
        return math.inf
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp(min=1e-30))


def check() -> list[dict[str, Any]]:
    """Kernels vs the reference (float64 on upcast inputs) on fresh random data."""
    rows = []
    shapes = [(2, 8, 2, 77, 333, 64, True, None), (1, 4, 4, 200, 200, 128, True, 64), (1, 8, 2, 33, 1000, 96, False, None)]
    for dtype, bound in ((torch.float32, 1e-4), (LOW, 1e-2)):
        x = torch.randn(2, 8, 301, 128, device=DEV).to(dtype)
        rows.append({"check": "head_norms", "dtype": str(dtype), "err": rel_err(K.head_norms(x), R.head_norms(x.double())), "bound": bound})
        for b, hq, hkv, tq, tk, d, causal, window in shapes:
            q = (torch.randn(b, hq, tq, d, device=DEV) * 2).to(dtype)
            k = (torch.randn(b, hkv, tk, d, device=DEV) * 2).to(dtype)
            e, lse = K.attention_entropy(q, k, causal=causal, window=window)
            er, lr = R.attention_entropy(q.double(), k.double(), causal=causal, window=window)
            m = K.attention_mass(q, k, causal=causal, window=window, lse=lse)
            mr = R.attention_mass(q.double(), k.double(), causal=causal, window=window)
            name = f"[{b},{hq}/{hkv},{tq}x{tk},{d}] causal={causal} window={window}"
            rows.append({"check": f"entropy {name}", "dtype": str(dtype), "err": rel_err(e, er), "bound": bound})
            rows.append({"check": f"lse {name}", "dtype": str(dtype), "err": rel_err(lse, lr), "bound": bound})
            rows.append({"check": f"mass {name}", "dtype": str(dtype), "err": rel_err(m, mr), "bound": bound})
        lat = torch.randn(1000, 512, device=DEV).to(dtype)
        rows.append({"check": "gram", "dtype": str(dtype), "err": rel_err(K.gram(lat), R.gram(lat.double())), "bound": bound})
    for row in rows:
        row["ok"] = row["err"] <= row["bound"]
    return rows


def bench_norms() -> list[dict[str, Any]]:
    shape = (2, 8, 256, 128) if SMOKE else (4, 8, 65536, 128)
    x = torch.randn(shape, device=DEV, dtype=LOW)
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    t_copy = bench(lambda: dst.copy_(x))
    copy_bw = 2 * nbytes / t_copy / 1e9  # read + write, TB/s
    rows = [{"what": "copy (read+write)", "ms": t_copy, "TB/s": copy_bw}]
    moved = nbytes + x[..., 0].numel() * 4
    for block_bytes, warps in ((16384, 4), (32768, 8), (8192, 4)):
        t = bench(lambda bb=block_bytes, w=warps: T.head_norms(x, block_bytes=bb, num_warps=w))
        rows.append({"what": f"head_norms block {block_bytes}B warps {warps}", "ms": t, "TB/s": moved / t / 1e9,
                     "of_copy": moved / t / 1e9 / copy_bw})
    rows[0]["bytes"] = nbytes
    return rows


def materialised_entropy(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float, mass: bool) -> torch.Tensor:
    """Softmax-entropy (or key mass) with the logits in memory, heads in chunks that fit."""
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    per_head = tq * tk * 14  # bf16 logits + fp32 logits + fp32 probabilities + fp32 products
    chunk = max(group, min(hq, MATERIALISED_LIMIT // per_head // group * group))
    outs = []
    for h0 in range(0, hq, chunk):
        kk = k[:, h0 // group:(h0 + chunk) // group].repeat_interleave(group, dim=1)
        s = torch.matmul(q[:, h0:h0 + chunk], kk.transpose(-1, -2)).float().mul_(scale).masked_fill_(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        if mass:
            outs.append(p.sum(dim=2).reshape(b, -1, group, tk).sum(dim=2))
        else:
            outs.append(torch.special.entr(p).sum(dim=-1))
    return torch.cat(outs, dim=1)


def bench_attention(tq: int, tk: int, with_materialised: bool) -> dict[str, Any]:
    b, hq, hkv, d = (1, 4, 2, 32) if SMOKE else (1, 32, 8, 128)
    dtype = LOW
    q = torch.randn(b, hq, tq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, device=DEV, dtype=dtype)
    scale = 1 / math.sqrt(d)
    row: dict[str, Any] = {"shape": f"B={b} Hq={hq} Hkv={hkv} D={d} Tq={tq} Tk={tk} causal bf16"}
    ent = lambda: A.attention_entropy(q, k, scale, True, None)  # noqa: E731
    lse = ent()[1]
    mass = lambda: A.attention_mass(q, k, lse, scale, True, None)  # noqa: E731
    row["entropy_ms"], row["entropy_peak"] = bench(ent), peak_bytes(ent)
    row["mass_ms"], row["mass_peak"] = bench(mass), peak_bytes(mass)
    # SDPA gets K/V expanded to Hq heads (outside the timing) so it takes its flash path; with
    # Tq < Tk it runs unmasked (its is_causal aligns queries to the start of the keys).
    ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    sdpa = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=tq == tk)  # noqa: E731
    row["sdpa_ms"], row["sdpa_peak"] = bench(sdpa), peak_bytes(sdpa)
    if with_materialised:
        mask = R.visibility_mask(tq, tk, causal=True, window=None, device=DEV)
        mat_e = lambda: materialised_entropy(q, k, mask, scale, False)  # noqa: E731
        mat_m = lambda: materialised_entropy(q, k, mask, scale, True)  # noqa: E731
        row["mat_entropy_err"] = rel_err(ent()[0], mat_e())
        row["mat_mass_err"] = rel_err(mass(), mat_m())
        row["mat_entropy_ms"], row["mat_entropy_peak"] = bench(mat_e), peak_bytes(mat_e)
        row["mat_mass_ms"], row["mat_mass_peak"] = bench(mat_m), peak_bytes(mat_m)
    return row


def sweep_entropy(t: int) -> list[dict[str, Any]]:
    b, hq, hkv, d = (1, 4, 2, 32) if SMOKE else (1, 32, 8, 128)
    q = torch.randn(b, hq, t, d, device=DEV, dtype=LOW)
    k = torch.randn(b, hkv, t, d, device=DEV, dtype=LOW)
    lse = A.attention_entropy(q, k, 0.1, True, None)[1]
    configs = [(16, 16, 1, 1)] if SMOKE else [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)]
    rows = []
    for cfg in configs:
        c = T.AttnConfig(*cfg)
        rows.append({"config": cfg, "entropy_ms": bench(lambda c=c: A.attention_entropy(q, k, 0.1, True, None, c)),
                     "mass_ms": bench(lambda c=c: A.attention_mass(q, k, lse, 0.1, True, None, c))})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    info = {"torch": torch.__version__, "device": "cpu" if SMOKE else torch.cuda.get_device_name()}
    import triton

    info["triton"] = triton.__version__
    print(json.dumps(info))
    checks = check()
    for row in checks:
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']:<60} {row['dtype']:<15} rel err {row['err']:.2e} (bound {row['bound']:.0e})")
    if not all(r["ok"] for r in checks):
        print("correctness check failed: no timings")
        return 1
    result: dict[str, Any] = {"info": info, "checks": checks, "norms": bench_norms()}
    for row in result["norms"]:
        print(json.dumps(row))
    result["sweep"] = [] if args.skip_sweep else sweep_entropy(256 if SMOKE else 16384)
    for row in result["sweep"]:
        print(json.dumps(row))
    result["attention"] = []
    sizes = [(128, 128), (64, 256)] if SMOKE else [(4096, 4096), (16384, 16384), (65536, 65536), (128, 4096), (128, 16384), (128, 65536)]
    for tq, tk in sizes:
        fits = SMOKE or tq * tk * 14 * 8 <= MATERIALISED_LIMIT * 4  # at most 4 chunks of 8 heads: bounded runtime
        row = bench_attention(tq, tk, fits)
        if not fits:
            row["materialised"] = f"skipped: the fp32 logits alone are {tq * tk * 4 / 2**30:.0f} GiB per head"
        print(json.dumps(row))
        result["attention"].append(row)
        torch.cuda.empty_cache() if not SMOKE else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_kernels.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
