"""What a written run says about itself: its run row and each generation's last step (pyarrow only).

`kvscope record` prints its summary from here and `kvscope ppl` its KV column: both read the trace
that was written, never state pulled back up from the recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

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
    (`final_seq_len`) and the layers recorded at that step (`layers_recorded`). Grouped in Arrow:
    a long run has millions of layer rows."""
    steps = _of_run(opened.read("steps", ["run_id", "gen_id", "step", "kv_bytes", "seq_len"]), run_id)
    last_step = steps.group_by("gen_id").aggregate([("step", "max")]).rename_columns(["gen_id", "step"])
    last = {r["gen_id"]: r for r in steps.join(last_step, ["gen_id", "step"], join_type="inner").to_pylist()}
    layers = _of_run(opened.read("layers", ["run_id", "gen_id", "step", "layer"]), run_id)
    counts = {(r["gen_id"], r["step"]): r["layer_count"]
              for r in layers.group_by(["gen_id", "step"]).aggregate([("layer", "count")]).to_pylist()}
    summaries = []
    for row in sorted(_of_run(opened.read("generations"), run_id).to_pylist(), key=lambda r: r["gen_id"]):
        step = last.get(row["gen_id"], {})
        summaries.append({**row, "last_kv_bytes": step.get("kv_bytes") or 0, "final_seq_len": step.get("seq_len") or 0,
                          "layers_recorded": counts.get((row["gen_id"], step.get("step")), 0)})
    return summaries


def _of_run(table: pa.Table, run_id: str) -> pa.Table:
    return table.filter(pc.equal(table["run_id"], run_id))
