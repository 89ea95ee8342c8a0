"""A synthetic fleet: many traces over hosts, models and transformers versions, with planted
conditions in a known set of them (tests of the engines, `scripts/bench_fleet.py`).

Trace i runs on host `gpu-{i % hosts}`, model `MODELS[i % 3]`, transformers `VERSIONS[(i // 3) % 3]`,
label `variant` = `bf16` or `int8` by parity, and starts i hours after 2026-11-01 (UTC). Conditions
are planted by index, so the set is known without reading the traces back:

- `leak` (live tensors retained after every generation: post_eos critical) when i % 10 == 3;
- `fragmentation` (reserved far above allocated, retries) when i % 10 == 7;
- `superlinear` (step totals grow quadratically: growth_curve) when i % 20 == 5;
- `odd_layer` (layer 1 at twice the bytes per token: layer_anomaly) when i % 25 == 11;
- `preallocated` (capacity four times the tokens: preallocation_waste) when i % 50 == 1; these
  traces have 16 KV heads of 64 (4 KiB per token per layer, not 512 B), so that the unused capacity
  passes preallocation_waste's 1 MiB floor even in a tiny fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from kvscope.trace.synth import SynthSpec, build_synthetic_trace

MODELS = ("llama-3.1-8b", "gemma-3-4b", "qwen3-4b")
VERSIONS = ("4.57.6", "5.17.0", "5.24.0")
START = datetime(2026, 11, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class FleetSize:
    """How big each trace is: layers rows per trace = layers × generations × steps."""

    # Attention layers per model.
    layers: int = 4
    # generate() calls per trace.
    generations: int = 2
    # Forward passes per generation (prefill + decode steps).
    steps: int = 16
    # Hosts the traces are spread over.
    hosts: int = 20

    @property
    def rows_per_trace(self) -> int:
        return self.layers * self.generations * self.steps


def planted(i: int) -> frozenset[str]:
    """The conditions planted in trace i."""
    rules = (("leak", 10, 3), ("fragmentation", 10, 7), ("superlinear", 20, 5), ("odd_layer", 25, 11),
             ("preallocated", 50, 1))
    return frozenset(name for name, every, at in rules if i % every == at)


def spec(i: int, size: FleetSize = FleetSize()) -> SynthSpec:
    """The SynthSpec of trace i."""
    found = planted(i)
    return SynthSpec(
        num_layers=size.layers, generations=size.generations, steps=size.steps, prompt_tokens=16,
        num_kv_heads=16 if "preallocated" in found else 4, head_dim=64 if "preallocated" in found else 32, run_id=f"run-{i:05d}", host=f"gpu-{i % size.hosts:02d}",
        model_name=MODELS[i % 3], transformers_version=VERSIONS[(i // 3) % 3],
        labels={"variant": "bf16" if i % 2 == 0 else "int8"}, started_at=START + timedelta(hours=i),
        retention=0.3 if "leak" in found else 0.0, fragmentation="fragmentation" in found,
        superlinear="superlinear" in found, odd_layer=1 if "odd_layer" in found else None,
        preallocated="preallocated" in found, seed=i,
    )


def build_fleet(root: str | Path, count: int, size: FleetSize = FleetSize(), start: int = 0) -> list[Path]:
    """Write traces start .. count-1 under `root` (trace-00000, ...; existing ones are kept)."""
    root = Path(root)
    paths = []
    for i in range(start, count):
        path = root / f"trace-{i:05d}"
        if not (path / "run").exists():
            build_synthetic_trace(path, spec(i, size))
        paths.append(path)
    return paths
