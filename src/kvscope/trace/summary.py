"""What a written run says about itself: its run row and each generation's last step (pyarrow only).

`kvscope record` prints its summary from here and `kvscope ppl` its KV column: both read the trace
that was written, never state pulled back up from the recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvscope.trace.reader import Trace, open_trace


@dataclass
class RunSummary:
    trace: Path
    model_name: str
    num_layers: int
    device: str
    generations: list[dict[str, Any]]  # `generation_summaries`
    nvml_total: int | None


def read_summary(trace: Path, run_id: str) -> RunSummary:
    """The run row's model, layers, device and NVML total, and `generation_summaries` of run `run_id`."""
    opened = open_trace(trace)
    (run,) = [r for r in opened.read("run", ["run_id", "model_name", "num_layers", "device", "nvml_total_bytes"])
              .to_pylist() if r["run_id"] == run_id]
    return RunSummary(trace, run["model_name"], run["num_layers"], run["device"],
                      generation_summaries(opened, run_id), run["nvml_total_bytes"])


def generation_summaries(opened: Trace, run_id: str) -> list[dict[str, Any]]:
    """Each generation's row with its last step's kv_bytes (`last_kv_bytes`) and seq_len
    (`final_seq_len`) and the layers recorded at that step (`layers_recorded`)."""
    steps = [r for r in opened.read("steps", ["run_id", "gen_id", "step", "kv_bytes", "seq_len"]).to_pylist()
             if r["run_id"] == run_id]
    last = {}
    for row in sorted(steps, key=lambda r: (r["gen_id"], r["step"])):
        last[row["gen_id"]] = row
    layers: dict[tuple[int, int], int] = {}
    for row in opened.read("layers", ["run_id", "gen_id", "step"]).to_pylist():
        if row["run_id"] == run_id:
            layers[(row["gen_id"], row["step"])] = layers.get((row["gen_id"], row["step"]), 0) + 1
    summaries = []
    for row in sorted((r for r in opened.read("generations").to_pylist() if r["run_id"] == run_id),
                      key=lambda r: r["gen_id"]):
        step = last.get(row["gen_id"], {})
        summaries.append({**row, "last_kv_bytes": step.get("kv_bytes") or 0, "final_seq_len": step.get("seq_len") or 0,
                          "layers_recorded": layers.get((row["gen_id"], step.get("step")), 0)})
    return summaries
