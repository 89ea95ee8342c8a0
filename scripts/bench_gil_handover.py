"""Does a sampler thread's GIL traffic slow a Python-bound decode loop? A CPU emulation.

    PYTHONPATH=src python3 scripts/bench_gil_handover.py [NEW_TOKENS] [ROUNDS]

A tiny 24-layer GPT-NeoX (random weights) decodes on the CPU, where, as on the GPU host, each step is
bound by Python. Variants: plain; a no-op forward hook; the recorder (no NVML on CPU); the recorder
with NVML faked on the old sampler *thread* (`NvmlSampler`: a 100 µs GIL-free call per step, like
NVML inside generate). Prints the median decode-step time per variant, interleaved over rounds.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList

import kvscope
from kvscope.recorder import session, telemetry

sys.path.insert(0, str(Path(__file__).parent))
from bench_recorder import StepClock  # noqa: E402 - the same per-step clock as the GPU benchmark

LIBC = ctypes.CDLL(None)
VARIANTS = ("plain", "noop_hook", "recorder", "recorder+fake_nvml_thread")


def fake_used(self: Any) -> int:
    LIBC.usleep(100)  # an NVML call inside generate: ~100 µs, GIL released (ctypes)
    return 123


def fake_init(self: Any, devices: tuple[int, ...], mode: object = "auto") -> None:
    self.handles, self.total, self.driver_version, self._pynvml = [1], 1 << 30, "fake", None


def main() -> None:
    new_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    config = AutoConfig.for_model("gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=24, num_attention_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.arange(3, 67).reshape(1, 64)
    original = (telemetry.NvmlProbe.__init__, telemetry.NvmlProbe.used, session.start_nvml_sampler)

    def run(variant: str) -> float:
        clock = StepClock()
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      logits_processor=LogitsProcessorList([clock]))
        fake = variant == "recorder+fake_nvml_thread"
        telemetry.NvmlProbe.__init__ = fake_init if fake else original[0]  # type: ignore[method-assign]
        telemetry.NvmlProbe.used = fake_used if fake else original[1]  # type: ignore[method-assign]
        session.start_nvml_sampler = (lambda probe, origin: telemetry.NvmlSampler(probe)) if fake else original[2]
        gc.collect()
        if variant == "plain":
            model.generate(ids, **kwargs)
        elif variant == "noop_hook":
            handle = model.register_forward_hook(lambda *hook_args: None, with_kwargs=True)
            model.generate(ids, **kwargs)
            handle.remove()
        else:
            with kvscope.record(model, tempfile.mkdtemp()):
                model.generate(ids, **kwargs)
        return statistics.median(clock.intervals_ms())

    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            results[variant].append(run(variant))
    base = statistics.median(results["plain"])
    for variant in VARIANTS:
        median = statistics.median(results[variant])
        runs = " ".join(f"{x:.3f}" for x in results[variant])
        print(f"{variant:26s} {median:7.3f} ms  {100 * (median / base - 1):+6.2f}%  runs: {runs}")


if __name__ == "__main__":
    main()
