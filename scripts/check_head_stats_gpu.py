"""Online head statistics on a GPU: generation unchanged and no error for large head dims, and the
cost of `head_stats_every=64` in tokens/s (issue 13). Prints and writes one JSON document.

    PYTHONPATH=src python3 scripts/check_head_stats_gpu.py --out results.json

Part 1: each model (Gemma 3 and Gemma 4 geometries, shrunk twins: every layer and head size kept),
eager and sdpa, a batch of 2 prompts (the second left-padded), greedy: the ids generated without
the recorder against `kvscope.record(..., head_stats_every=1)`; error events and head_stats rows.
Part 2: the pythia-1.4b twin (bf16, 64-token prompt, 512 new tokens): plain generate, recording
without and with head_stats_every=64, interleaved rounds; median tokens/s per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvscope.recorder.session import record
from kvscope.trace.reader import open_trace
from kvscope.twins.build import build_twin
from kvscope.twins.spec import TwinSpec, list_twins, load_twin, shrink_config

# Gemma 4 E2B's attention geometry (published config): 35 layers, 5 sliding (W=512, head_dim 256)
# to 1 full (head_dim 512), 1 kv head, the last 20 layers share the KV of earlier ones.
GEMMA4_E2B = TwinSpec("gemma-4-e2b-geometry", "google/gemma-4-E2B (attention geometry)", "bfloat16", {
    "model_type": "gemma4_text", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 35,
    "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 512,
    "sliding_window": 512, "num_kv_shared_layers": 20, "vocab_size": 4096, "vocab_size_per_layer_input": 4096,
    "hidden_size_per_layer_input": 64}, shrunk=True)


def _specs() -> list[TwinSpec]:
    specs = [shrink_config(load_twin("gemma-3-4b"))]
    shipped = [n for n in list_twins() if n.startswith("gemma-4")]
    specs += [shrink_config(load_twin(n)) for n in shipped] if shipped else [GEMMA4_E2B]
    return [dataclasses.replace(s, dtype="bfloat16") for s in specs]


def _inputs(model: torch.nn.Module, prompt: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 1, (2, prompt), generator=gen)
    mask = torch.ones(2, prompt, dtype=torch.long)
    ids[1, :pad] = model.generation_config.pad_token_id
    mask[1, :pad] = 0
    return ids.cuda(), mask.cuda()


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    torch.cuda.synchronize()
    return out


def identity_checks(tmp: Path) -> list[dict[str, Any]]:
    results = []
    for spec in _specs():
        for attn in ("eager", "sdpa"):
            entry: dict[str, Any] = {"model": spec.name, "attn": attn}
            try:
                model = build_twin(spec, dtype="bfloat16", device="cuda", attn_implementation=attn)
            except (ValueError, ImportError) as exc:
                entry["skipped"] = str(exc)[:200]
                results.append(entry)
                continue
            ids, mask = _inputs(model, 40, 12)
            want = _generate(model, ids, mask, 48)
            path = tmp / f"{spec.name}-{attn}"
            start = time.perf_counter()
            try:
                with record(model, path, head_stats_every=1):
                    got = _generate(model, ids, mask, 48)
            except Exception as exc:  # noqa: BLE001 - reported, the point of the check
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                results.append(entry)
                continue
            trace = open_trace(path)
            events = trace.read("events").to_pylist() if trace.num_rows("events") else []
            stats = trace.read("head_stats").to_pylist()
            entry.update(
                identical=bool(torch.equal(got, want)), seconds_with_stats=round(time.perf_counter() - start, 2),
                error_events=[e["detail"][:300] for e in events if e["kind"] == "error"],
                head_stats_rows=len(stats), steps_with_stats=len({r["step"] for r in stats}),
                head_dims=sorted({int(getattr(m, "head_dim", 0)) for m in model.modules() if hasattr(m, "scaling")}),
                entropy_mean_range=[round(min(r["value"] for r in stats if r["stat"] == "entropy_mean"), 4),
                                    round(max(r["value"] for r in stats if r["stat"] == "entropy_mean"), 4)])
            results.append(entry)
            print(json.dumps(entry), flush=True)
            del model
            torch.cuda.empty_cache()
    return results


def overhead(tmp: Path, rounds: int) -> dict[str, Any]:
    spec = load_twin("pythia-1.4b")
    model = build_twin(spec, dtype="bfloat16", device="cuda")
    ids = torch.randint(3, 50000, (1, 64), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    new = 512
    _generate(model, ids, mask, 32)  # warm-up: kernels loaded, allocator grown
    with record(model, tmp / "warm", head_stats_every=64):
        _generate(model, ids, mask, 65)  # compiles the statistic kernels once
    times: dict[str, list[float]] = {"plain": [], "record": [], "record_head_stats_64": []}
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for variant in order:
            start = time.perf_counter()
            if variant == "plain":
                _generate(model, ids, mask, new)
            else:
                every = 64 if variant == "record_head_stats_64" else 0
                with record(model, tmp / f"{variant}-{r}", head_stats_every=every) as rec:
                    start = time.perf_counter()  # the generate call only: enter/exit are not per-token costs
                    _generate(model, ids, mask, new)
                    elapsed = time.perf_counter() - start
                    rec.settle()
                times[variant].append(new / elapsed)
                continue
            times[variant].append(new / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens_per_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "median_tokens_per_s": {k: round(v, 2) for k, v in med.items()},
            "head_stats_64_vs_record": round(med["record_head_stats_64"] / med["record"] - 1, 4),
            "head_stats_64_vs_plain": round(med["record_head_stats_64"] / med["plain"] - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        import transformers
        import triton

        doc.update(transformers=transformers.__version__, triton=triton.__version__)
        doc["identity"] = identity_checks(Path(tmp))
        doc["overhead"] = overhead(Path(tmp), args.rounds)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["overhead"]), flush=True)


if __name__ == "__main__":
    main()
