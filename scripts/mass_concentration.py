"""How much of a real model's attention the lightest keys carry: the fraction of cached keys whose
combined attention is 1% (and 5%) of a decode step's mass, per layer band.

Runs SmolLM2-135M-Instruct (`builtin:smollm2`, eager attention, float32, CPU) over the first
built-in prompts with the online head-statistics collector keeping its per-key masses
(`keep_raw`), then, for every decode step, layer and KV head: sort the keys by the probability the
new token gives them (averaged over the head's query group), and count how many of the lightest
fit within 1% / 5% of the total. Prints one JSON object.

    PYTHONPATH=src python3 scripts/mass_concentration.py --prompts 4 --new 64
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvscope.kernels.online import HeadStatsCollector
from kvscope.ppl.models import load_model
from kvscope.workload.prompt_set import load_prompts


def light_fractions(mass: torch.Tensor, cuts: tuple[float, ...]) -> dict[float, list[float]]:
    """mass [B, Hkv, Tk] (per-key mean probability of one decode step): per (sequence, head), the
    fraction of keys whose combined mass is at most each cut of the total."""
    out: dict[float, list[float]] = {c: [] for c in cuts}
    flat = mass.double().reshape(-1, mass.shape[-1])
    for row in flat:
        total = float(row.sum())
        if total <= 0 or row.numel() < 2:
            continue
        cumulative = torch.cumsum(torch.sort(row).values, 0) / total
        for c in cuts:
            out[c].append(int((cumulative <= c).sum()) / row.numel())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("builtin:smollm2", dtype="float32")
    model = loaded.model.eval()
    model.set_attn_implementation("eager")
    layers = model.config.num_hidden_layers
    cuts = (0.01, 0.05)
    bands = {"layers 0-9": range(0, 10), "layers 10-19": range(10, 20), "layers 20-29": range(20, 30)}
    per_band: dict[str, dict[float, list[float]]] = {b: {c: [] for c in cuts} for b in bands}
    contexts = []
    for prompt in load_prompts(limit=args.prompts):
        ids = torch.tensor([loaded.encode(prompt.text)])
        collector = HeadStatsCollector(every=8, keep_raw=True)
        with collector.install(model), torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False)
        for (_, step, layer), r in collector.raw.items():
            if step == 0:
                continue  # the prefill: each key's mass averages every query that sees it
            contexts.append(int(r["mass"].shape[-1]))
            for band, members in bands.items():
                if layer in members:
                    for c, values in light_fractions(r["mass"], cuts).items():
                        per_band[band][c].extend(values)
    summary = {band: {f"keys_within_{int(c * 100)}pct_mass": {
        "median": round(statistics.median(v), 3), "p10": round(statistics.quantiles(v, n=10)[0], 3),
        "p90": round(statistics.quantiles(v, n=10)[-1], 3), "heads_x_steps": len(v)} for c, v in cs.items()}
        for band, cs in per_band.items()}
    print(json.dumps({"model": loaded.name, "layers": layers, "prompts": args.prompts, "new_tokens": args.new,
                      "context_tokens": [min(contexts), max(contexts)], "bands": summary}, indent=1))


if __name__ == "__main__":
    main()
