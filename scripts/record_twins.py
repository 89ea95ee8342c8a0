"""Record the shipped twins (shrunk, bf16) for docs/findings.md: per twin one trace, a few prompt lengths.

Each generation is a random-id prompt of the given length and `--new` generated tokens (forced with
min_new_tokens, so random weights never stop early); outputs dropped and settle() called after each.
gpt-oss-120b also gets one generation whose context reaches 4096 tokens (a 4000-token prompt), for
the published sliding-vs-full claim. `--spread N --max-context C` replaces `--prompts` with N prompt
lengths spaced evenly from 64 tokens to C - new (the last generation's context reaches C).

    python scripts/record_twins.py OUT [--twin NAME ...] [--new 192] [--prompts 64,1100] [--device cuda]
    python scripts/record_twins.py OUT --new 48 --spread 15 --max-context 4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kvscope.recorder.session import Recording
from kvscope.twins import list_twins, load_twin, shrink_config
from kvscope.twins.build import build_twin

LONG = {"gpt-oss-120b": (4000, 96)}  # (prompt tokens, new tokens): context 4096 at the last step


def record_twin(name: str, out: Path, prompts: list[int], new: int, device: str) -> float:
    started = time.perf_counter()
    spec = shrink_config(load_twin(name))
    model = build_twin(spec, dtype="bfloat16", device=device)
    vocab = int(model.config.get_text_config().vocab_size)
    long_run = [LONG[name]] if name in LONG and max(prompts) + new < sum(LONG[name]) else []
    runs = [(p, new) for p in prompts] + long_run
    with Recording(model, out / name, model_name=f"{name} (twin, shrunk)", labels={"twin": name}, writer="thread",
                   options={"script": "scripts/record_twins.py"}) as rec:
        for i, (tokens, n) in enumerate(runs):
            ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(i)).to(device)
            rec.next_prompt(f"twin-{tokens}-{n}")
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)
            del output, ids
            rec.settle()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--twin", action="append", help="twin name (repeatable); default: every shipped twin")
    parser.add_argument("--new", type=int, default=192)
    parser.add_argument("--prompts", default="64,1100")
    parser.add_argument("--spread", type=int, help="this many prompt lengths from 64 to --max-context - --new")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    prompts = [int(x) for x in args.prompts.split(",")]
    if args.spread:
        last = args.max_context - args.new
        prompts = [round(64 + i * (last - 64) / max(args.spread - 1, 1)) for i in range(args.spread)]
    print(f"prompt tokens: {prompts}, {args.new} new each", flush=True)
    for name in args.twin or list_twins():
        try:
            seconds = record_twin(name, args.out, prompts, args.new, args.device)
            print(f"{name}: {seconds:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - one twin failing (an old transformers) must not stop the rest
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
