"""What a `kvscope.record` block costs to open and close, and what its first generation costs.

    PYTHONPATH=src python scripts/bench_record_block.py                    # CPU, shrunk pythia-1.4b twin
    PYTHONPATH=src python scripts/bench_record_block.py --device cuda --dtype bfloat16 --no-shrink \\
        --blocks 6 --fresh 3 --out docs/bench/record-block-h200.json      # the H200 run
    PYTHONPATH=src python scripts/bench_record_block.py --smoke            # seconds: what `make test` runs

Per option set (defaults = writer process; writer="thread"; nvml=False; native=False), in one
process: `blocks` blocks one after another, each timing `__enter__`, its first generation
(`generate` of `--new-tokens`, then `settle()`) and `__exit__`; block 1 is reported apart from the
later ones (they reuse the idle writer process). `--fresh N` also times N blocks in fresh processes
(imports and the model loaded before the clock starts), and how long the writer process takes to be
ready there (`wait_ready`, the supported seam). Steady state: plain and recorded generations of
`--steady-tokens`, interleaved, their median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import kvscope
from kvscope.twins import load_twin, shrink_config
from kvscope.twins.build import build_twin

OPTION_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "writer=thread": {"writer": "thread"},
    "nvml=False": {"nvml": False},
    "native=False": {"native": False},
}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.smoke:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()
    spec = load_twin(args.twin)
    return build_twin(shrink_config(spec) if args.shrink else spec, dtype=args.dtype, device=args.device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> None:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False)
    _sync()
    del out


def time_block(model: torch.nn.Module, ids: torch.Tensor, tokens: int, workdir: Path, options: dict[str, Any],
               ready: bool = False) -> dict[str, float]:
    """Seconds of enter, first generation, its settle (gc.collect and empty_cache: the protocol's own
    cost) and exit of one block."""
    rec = kvscope.record(model, Path(tempfile.mkdtemp(dir=workdir)), **options)
    start = time.perf_counter()
    rec.__enter__()
    entered = time.perf_counter()
    result = {"enter_s": entered - start}
    if ready:  # only where asked: it waits for the writer process, which the block itself never does
        rec.wait_ready(120)
        result["writer_ready_s"] = time.perf_counter() - entered
        entered = time.perf_counter()
    _generate(model, ids, tokens)
    generated = time.perf_counter()
    rec.settle()
    settled = time.perf_counter()
    rec.__exit__(None, None, None)
    result.update(first_generation_s=generated - entered, settle_s=settled - generated,
                  exit_s=time.perf_counter() - settled)
    return result


def steady_state(model: torch.nn.Module, ids: torch.Tensor, tokens: int, rounds: int, workdir: Path) -> dict:
    ratios, plain_s, recorded_s = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        _generate(model, ids, tokens)
        plain = time.perf_counter() - start
        with kvscope.record(model, Path(tempfile.mkdtemp(dir=workdir))) as rec:
            rec.wait_ready(120)  # steady state: the writer is running, as it is after a block's first seconds
            start = time.perf_counter()
            _generate(model, ids, tokens)
            recorded = time.perf_counter() - start
        plain_s.append(plain)
        recorded_s.append(recorded)
        ratios.append(recorded / plain - 1)
    return {"tokens": tokens, "plain_s_median": statistics.median(plain_s),
            "recorded_s_median": statistics.median(recorded_s), "overhead_median": statistics.median(ratios),
            "rounds": rounds}


def _median(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twin", default="pythia-1.4b")
    parser.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=2, help="blocks timed in fresh processes, per option set")
    parser.add_argument("--steady-tokens", type=int, default=64)
    parser.add_argument("--steady-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one block each: checks the script runs")
    parser.add_argument("--one-block", help=argparse.SUPPRESS)  # internal: a fresh process's single block
    args = parser.parse_args()
    if args.smoke:
        args.blocks, args.fresh, args.steady_tokens, args.steady_rounds, args.new_tokens = 2, 1, 4, 1, 3
        args.prompt_tokens = 5
    warnings.simplefilter("ignore")
    model = build_model(args)
    ids = (torch.arange(args.prompt_tokens) % 200 + 3).reshape(1, -1).to(args.device)
    _generate(model, ids, args.new_tokens)  # warm the model and generate's code paths
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.one_block is not None:
            print(json.dumps(time_block(model, ids, args.new_tokens, workdir, OPTION_SETS[args.one_block],
                                        ready=True)))
            return 0
        report: dict[str, Any] = {"device": args.device, "twin": "tiny gpt_neox" if args.smoke else args.twin,
                                  "shrink": args.shrink, "dtype": str(next(model.parameters()).dtype),
                                  "new_tokens": args.new_tokens, "host_cpus": len(__import__("os").sched_getaffinity(0)),
                                  "option_sets": {}}
        for name, options in OPTION_SETS.items():
            if args.smoke and name not in ("defaults", "writer=thread"):
                continue
            blocks = [time_block(model, ids, args.new_tokens, workdir, options) for _ in range(args.blocks)]
            fresh = []
            for _ in range(args.fresh if name == "defaults" or not args.smoke else 0):
                command = [sys.executable, __file__, "--one-block", name, *_passed_on(args)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                fresh.append(json.loads(done.stdout.strip().splitlines()[-1]))
            later = blocks[1:]
            report["option_sets"][name] = {
                "first_block": blocks[0], "later_blocks_median": {k: _median(later, k) for k in blocks[0]},
                "fresh_process_median": {k: _median(fresh, k) for k in (fresh[0] if fresh else {})},
                "blocks": blocks, "fresh": fresh}
        report["steady_state"] = steady_state(model, ids, args.steady_tokens, args.steady_rounds, workdir)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    _print_table(report)
    return 0


def _passed_on(args: argparse.Namespace) -> list[str]:
    passed = ["--twin", args.twin, "--device", args.device, "--prompt-tokens", str(args.prompt_tokens),
              "--new-tokens", str(args.new_tokens), "--shrink" if args.shrink else "--no-shrink"]
    if args.dtype:
        passed += ["--dtype", args.dtype]
    if args.smoke:
        passed.append("--smoke")
    return passed


def _print_table(report: dict[str, Any]) -> None:
    print(f"{'options':14} {'where':22} {'enter s':>8} {'ready s':>8} {'1st gen s':>8} {'settle s':>8} {'exit s':>8}")
    for name, entry in report["option_sets"].items():
        for where, row in (("first block", entry["first_block"]), ("later blocks (median)", entry["later_blocks_median"]),
                           ("fresh process (median)", entry["fresh_process_median"])):
            if not row:
                continue
            cells = [row.get(k) for k in ("enter_s", "writer_ready_s", "first_generation_s", "settle_s", "exit_s")]
            print(f"{name:14} {where:22} " + " ".join(f"{c:8.3f}" if c is not None else f"{'-':>8}" for c in cells))
    steady = report["steady_state"]
    print(f"steady state, {steady['tokens']} tokens: plain {steady['plain_s_median']:.3f} s, recorded "
          f"{steady['recorded_s_median']:.3f} s, overhead {steady['overhead_median'] * 100:+.1f}% (median of "
          f"{steady['rounds']})")


if __name__ == "__main__":
    raise SystemExit(main())
