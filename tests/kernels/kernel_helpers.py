"""Helpers of the kernel tests: KV samples written as the recorder writes them."""

from __future__ import annotations

from pathlib import Path

import torch

from kvscope.trace.reader import open_trace
from kvscope.trace.writer import TraceWriter


def _run_id(trace: Path) -> str:
    return open_trace(trace).read("run", ["run_id"])["run_id"][0].as_py()


def add_samples(trace: Path, samples: dict[tuple[int, int, int], dict[str, torch.Tensor]]) -> None:
    """Append kv_samples rows: {(gen, step, layer): {"k": tensor, ...}} as the recorder writes them."""
    run_id = _run_id(trace)
    with TraceWriter(trace) as writer:
        for (gen, step, layer), tensors in samples.items():
            for name, x in tensors.items():
                x = x.contiguous()
                writer.append("kv_samples", {
                    "run_id": run_id, "gen_id": gen, "step": step, "layer": layer, "tensor": name,
                    "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
                    "data": x.view(-1).view(torch.uint8).numpy().tobytes(),
                })
