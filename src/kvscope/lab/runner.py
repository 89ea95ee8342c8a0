"""Run the lab: record each scenario into its own trace, label the runs, write labels.csv."""

from __future__ import annotations

import csv
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvscope.errors import UsageError
from kvscope.lab.scenarios import (
    SCENARIOS,
    LabSettings,
    Scenario,
    build_model,
    oom_under_fraction,
    prefill_bytes,
    scenario_names,
    unfit,
    zero_head,
)

# Detectors that the lab's scenarios are about: labels.csv has a row per run for each.
LAB_DETECTORS = ("growth_curve", "post_eos", "fragmentation", "oom_event", "oom_forecast", "preallocation_waste",
                 "layer_anomaly", "layer_uniformity", "dead_heads")


@dataclass
class LabResult:
    """One scenario: where its trace is, its labels, or why it was skipped."""

    name: str
    planted: bool
    expected: tuple[str, ...]
    trace: Path | None = None
    run_id: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def _fraction_for(extra_bytes: int, device: torch.device) -> tuple[float, int]:
    """A per-process memory fraction that leaves `extra_bytes` above what is reserved now."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    limit = torch.cuda.memory_reserved(index) + extra_bytes
    return limit / total, int(limit / total * total)


def run_scenario(scenario: Scenario, out: Path, settings: LabSettings) -> LabResult:
    """Plant one scenario in a fresh twin, record it to `out/<name>`, and label the run."""
    from kvscope.recorder.session import Recording

    result = LabResult(scenario.name, scenario.planted, scenario.expected)
    if scenario.needs_cuda and not settings.cuda:
        result.skipped = f"{scenario.name} needs CUDA (allocator pools, memory fractions or compile): skipped on " \
                         f"{settings.device}"
        return result
    started = time.perf_counter()
    model = build_model(settings, scenario.attn_implementation)
    result.skipped = unfit(scenario.name, model, settings)
    if result.skipped is not None:
        del model
        return result
    if scenario.name == "dead_head":
        zero_head(model, 1, 1)
    path = out / scenario.name
    lab: dict[str, Any] = {}
    options: dict[str, Any] = {"lab": scenario.name}
    fraction_set = False
    if scenario.name in ("oom_fraction", "healthy_fraction") and settings.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        extra = 2 << 30  # healthy_fraction: room to spare
        if scenario.name == "oom_fraction":  # room for the prefill and 256 MiB of decoding (gpt-oss-20b twin: 29 steps)
            lab["prefill_bytes"] = prefill_bytes(model)
            extra = lab["prefill_bytes"] + (256 << 20)
        fraction, limit = _fraction_for(extra, model.device)
        torch.cuda.set_per_process_memory_fraction(fraction, model.device)
        fraction_set = True
        lab["limit_bytes"] = limit
        options["memory_limit_bytes"] = limit  # for a torch that cannot report the fraction
        options["memory_fraction"] = fraction
    labels = {"lab": scenario.name, "planted": "yes" if scenario.planted else "no",
              "expected": ",".join(scenario.expected), "condition": scenario.description,
              "lab_device": settings.device}
    try:
        with Recording(model, path, labels=labels, model_name=f"{settings.twin} (lab twin)", options=options,
                       head_stats_every=scenario.head_stats_every, writer=settings.writer) as rec:
            if scenario.run is oom_under_fraction:
                notes = oom_under_fraction(model, settings, rec, lab)
            else:
                notes = scenario.run(model, settings, rec)
            result.run_id = rec.run_id
    finally:
        if fraction_set:
            torch.cuda.set_per_process_memory_fraction(1.0, model.device)
    result.trace, result.notes = path, dict(notes or {})
    result.seconds = time.perf_counter() - started
    del model
    gc.collect()
    if settings.cuda:
        torch.cuda.empty_cache()
    return result


def write_labels(results: list[LabResult], path: Path) -> Path:
    """labels.csv for `kvscope tune`: per recorded run and lab detector, whether it should warn."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_id", "gen_id", "expected", "detector", "scenario"])
        for r in results:
            if r.run_id is None:
                continue
            for det in LAB_DETECTORS:
                writer.writerow([r.run_id, "", int(det in r.expected), det, r.name])
    return path


def run_lab(out: str | Path, settings: LabSettings | None = None, only: list[str] | None = None,
            progress: Callable[[LabResult], None] | None = None) -> list[LabResult]:
    """Record every scenario (or those named in `only`) under `out`; write labels.csv and lab.json."""
    settings = settings or LabSettings()
    unknown = sorted(set(only or []) - set(scenario_names()))
    if unknown:
        raise UsageError(f"unknown lab scenario(s) {', '.join(unknown)}; known: {', '.join(scenario_names())}.")
    if settings.cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {settings.device} but CUDA is not available here; use --device cpu.")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for scenario in SCENARIOS:
        if only and scenario.name not in only:
            continue
        if (root / scenario.name).exists():
            raise UsageError(f"{root / scenario.name} exists: give an empty output directory.")
        result = run_scenario(scenario, root, settings)
        results.append(result)
        if progress is not None:
            progress(result)
    write_labels(results, root / "labels.csv")
    (root / "lab.json").write_text(json.dumps([{
        "scenario": r.name, "planted": r.planted, "expected": list(r.expected), "run_id": r.run_id,
        "trace": r.trace.name if r.trace else None, "skipped": r.skipped, "seconds": round(r.seconds, 2),
        "notes": r.notes} for r in results], indent=1, default=str))
    return results
