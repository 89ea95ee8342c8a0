"""Build synthetic traces of a given KV geometry, with optional planted conditions.

Tests, docs and benchmarks use these traces; they go through the same writer as recordings.
A healthy trace has linear growth, sliding layers saturating at their window, memory back to
baseline after each generation and a few percent of reserved-but-unused memory. Each plant adds
one condition, touching only what that condition changes:

- `retention`: live tensors stay allocated after each generation (post_eos).
- `fragmentation`: reserved far above allocated, split blocks and allocator retries (fragmentation).
- `superlinear`: the step totals grow quadratically, as if a copy of the cache were kept every step
  (growth_curve); each layer's own tensors stay healthy.
- `odd_layer`: one layer stores `odd_layer_factor` times the bytes per token of its peers
  (layer_anomaly).
- `undeclared_sliding`: layers declared sliding that never saturate (layer_uniformity).
- `preallocated`: static-cache style layers whose capacity far exceeds what they hold.
- `outside_growth`: memory outside PyTorch's allocator keeps rising by the same amount after every
  generation instead of levelling off after the warm-up (post_eos).

Healthy traces load kernels and size workspaces on first use: memory outside the allocator rises
after the first generations (130 MiB, then 20 MiB twice) and then levels off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from kvscope.schema.metadata import TraceMetadata
from kvscope.trace.writer import TraceWriter

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8_e4m3fn": 1, "uint8": 1}
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class SynthSpec:
    """Geometry, length and planted conditions of a synthetic trace."""

    num_layers: int = 4
    # None: every layer "full_attention"; otherwise one entry per layer.
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    num_kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "bfloat16"
    # MLA geometry; used for layers whose type is "latent".
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    num_attention_heads: int | None = None
    generations: int = 1
    prompt_tokens: int = 64
    steps: int = 128  # forward passes per generation: prefill + (steps - 1) decode steps
    batch_size: int = 1
    device: str = "cuda:0"  # "cpu" gives null GPU readings
    weights_bytes: int = 2 * GIB
    total_memory_bytes: int = 80 * GIB
    model_name: str = "synthetic"
    model_type: str = "synthetic"
    labels: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    # Run metadata a fleet groups by (None: this machine's host name, no transformers version, now).
    host: str | None = None
    transformers_version: str | None = None
    started_at: datetime | None = None
    # Planted conditions (all off: a healthy trace).
    retention: float = 0.0  # fraction of each generation's peak growth left allocated afterwards
    fragmentation: bool = False
    superlinear: bool = False
    odd_layer: int | None = None
    odd_layer_factor: float = 2.0
    undeclared_sliding: bool = False
    preallocated: bool = False
    outside_growth: bool = False
    # A model split over devices (device_map): the devices and how many consecutive layers each
    # holds (None: one device, no per-device tables). Weights split like the layers.
    devices: tuple[str, ...] | None = None
    layers_per_device: tuple[int, ...] | None = None
    device_memory_bytes: tuple[int, ...] | None = None  # per device (None: total_memory_bytes each)
    retention_device: str | None = None  # plant the retention on this device only
    # One rank of a tensor-parallel job (each rank its own run, on cuda:<rank>).
    job_id: str | None = None
    rank: int | None = None
    world_size: int | None = None
    seed: int = 0

    def resolved_layer_types(self) -> list[str]:
        if self.layer_types is None:
            return ["full_attention"] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        return list(self.layer_types)

    def device_of_layers(self) -> list[str]:
        """The device of each layer's cache (split over `devices` in order)."""
        if not self.devices:
            return [self.device] * self.num_layers
        counts = self.layers_per_device or tuple(
            self.num_layers // len(self.devices) + (i < self.num_layers % len(self.devices))
            for i in range(len(self.devices)))
        if len(counts) != len(self.devices) or sum(counts) != self.num_layers:
            raise ValueError(f"layers_per_device {counts} must give each of {len(self.devices)} devices its layers "
                             f"({self.num_layers} in all)")
        return [d for d, n in zip(self.devices, counts, strict=True) for _ in range(n)]

    def model_config(self) -> dict[str, object]:
        config: dict[str, object] = {
            "model_type": self.model_type,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_attention_heads": self.num_attention_heads or self.num_kv_heads,
            "head_dim": self.head_dim,
            "layer_types": self.resolved_layer_types(),
            "sliding_window": self.sliding_window,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }
        if self.kv_lora_rank is not None:
            config["kv_lora_rank"] = self.kv_lora_rank
            config["qk_rope_head_dim"] = self.qk_rope_head_dim
        return config


def _layer_geometry(spec: SynthSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per layer: K elements per token, V elements per token, token limit (0 = none), types."""
    types = spec.resolved_layer_types()
    k_elems, v_elems, limit = [], [], []
    for kind in types:
        if kind == "latent":
            if spec.kv_lora_rank is None or spec.qk_rope_head_dim is None:
                raise ValueError("latent layers need kv_lora_rank and qk_rope_head_dim")
            k, v = spec.kv_lora_rank, spec.qk_rope_head_dim
        else:
            k = v = spec.num_kv_heads * spec.head_dim
        k_elems.append(k)
        v_elems.append(v)
        saturates = kind == "sliding_attention" and spec.sliding_window and not spec.undeclared_sliding
        # Dynamic sliding layers (transformers >= 4.56) keep the last W - 1 tokens.
        limit.append(spec.sliding_window - 1 if saturates else 0)
    return np.array(k_elems), np.array(v_elems), np.array(limit), types


def _shape_array(batch: int, heads: np.ndarray, tokens: np.ndarray, dims: np.ndarray) -> pa.Array:
    values = np.stack([np.full_like(tokens, batch), heads, tokens, dims], axis=1).reshape(-1)
    offsets = np.arange(0, len(values) + 1, 4, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))


def build_synthetic_trace(path: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write a synthetic trace to `path` (a new or empty directory) and return the path."""
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    es = DTYPE_BYTES[spec.dtype]
    k_elems, v_elems, limit, types = _layer_geometry(spec)
    num_layers, steps, batch = spec.num_layers, spec.steps, spec.batch_size
    on_gpu = spec.device.startswith("cuda")
    # the odd layer stores more bytes per element (e.g. float32 in a bfloat16 model)
    layer_es = np.array([es * spec.odd_layer_factor if spec.odd_layer == i else es for i in range(num_layers)])
    wide = {1: "int8", 2: "bfloat16", 4: "float32", 8: "float64"}
    dtypes = [wide.get(int(e), spec.dtype) if spec.odd_layer == i else spec.dtype
              for i, e in enumerate(layer_es)]
    meta = TraceMetadata(
        model_name=spec.model_name,
        model_type=spec.model_type,
        num_layers=num_layers,
        layer_types=types,
        dtype=spec.dtype,
        device=spec.device,
        model_config=spec.model_config(),
        attn_implementation="sdpa",
        labels=dict(spec.labels),
        gpu_name="NVIDIA H100 80GB HBM3 (synthetic)" if on_gpu else None,
        driver_version="580.159.04" if on_gpu else None,
        tokenizer="synthetic",
        options={"synthetic": True},
        nvml_total_bytes=spec.total_memory_bytes if on_gpu else None,
        **({"run_id": spec.run_id} if spec.run_id else {}),
        **({"host": spec.host} if spec.host else {}),
        **({"started_at": spec.started_at} if spec.started_at else {}),
        transformers_version=spec.transformers_version,
        job_id=spec.job_id, rank=spec.rank, world_size=spec.world_size,
    )
    writer = TraceWriter(path)
    writer.append("run", meta.to_row())

    context_bytes = 500 * MIB  # CUDA context and libraries, outside the allocator
    activation_bytes = 64 * MIB
    retained = 0
    nvml_extra = 0
    clock = 0
    gen_rows: dict[str, list[object]] = {}
    retained_by_device: dict[str, int] = {}
    for gen in range(spec.generations):
        step_idx = np.arange(steps)
        seq_len = spec.prompt_tokens + step_idx  # tokens in context after each step
        # stored tokens per (layer, step), layer-major to match the compacted sort order
        stored = np.where(limit[:, None] > 0, np.minimum(seq_len[None, :], limit[:, None]), seq_len[None, :])
        capacity = None
        if spec.preallocated:
            capacity = np.full_like(stored, 4 * (spec.prompt_tokens + steps))
        held = capacity if capacity is not None else stored
        k_bytes = held * k_elems[:, None] * layer_es[:, None] * batch
        v_bytes = held * v_elems[:, None] * layer_es[:, None] * batch
        k_bytes, v_bytes = k_bytes.astype(np.int64), v_bytes.astype(np.int64)
        kv_layer = k_bytes + v_bytes
        kv_total = kv_layer.sum(axis=0)
        if spec.superlinear:
            # a copy of (part of) the cache kept every step: quadratic in the steps taken
            per_token = int(((k_elems + v_elems) * layer_es).sum()) * batch
            kv_total = kv_total + (per_token * step_idx.astype(np.int64) ** 2 * 2) // max(steps, 1)

        baseline_alloc = spec.weights_bytes + retained
        allocated = baseline_alloc + activation_bytes + kv_total
        if spec.fragmentation:
            reserved = (allocated * 1.35).astype(np.int64)
            inactive_split = (allocated * 0.2).astype(np.int64)
            retries = np.cumsum(rng.random(steps) < 0.05).astype(np.int64) + 1
        else:
            reserved = ((allocated + 2 * MIB - 1) // (2 * MIB)) * (2 * MIB) + 8 * MIB
            inactive_split = np.full(steps, 1 * MIB, dtype=np.int64)
            retries = np.zeros(steps, dtype=np.int64)
        # kernels and workspaces loaded on first use, levelling off after the first generations
        warmup = 130 * MIB if gen == 0 else 20 * MIB if gen < 3 or spec.outside_growth else 0
        nvml_used = reserved + context_bytes + nvml_extra + warmup
        step_ns = 22_000_000 + rng.integers(0, 1_000_000, steps)
        t_ns = clock + np.cumsum(step_ns)
        started = clock
        clock = int(t_ns[-1]) + 1_000_000

        layer_ids = np.repeat(np.arange(num_layers), steps)
        flat_stored = stored.reshape(-1)
        heads = np.repeat(np.where(np.array(types) == "latent", 1, spec.num_kv_heads), steps)
        k_dim = np.repeat(np.where(np.array(types) == "latent", k_elems, k_elems // spec.num_kv_heads), steps)
        v_dim = np.repeat(np.where(np.array(types) == "latent", v_elems, v_elems // spec.num_kv_heads), steps)
        held_flat = held.reshape(-1)
        n = num_layers * steps
        layers = pa.table({
            "run_id": pa.array([meta.run_id] * n),
            "gen_id": pa.array(np.full(n, gen, dtype=np.int32)),
            "step": pa.array(np.tile(step_idx, num_layers).astype(np.int32)),
            "layer": pa.array(layer_ids.astype(np.int32)),
            "layer_type": pa.array(np.repeat(np.array(types), steps)),
            "cache_layer_class": pa.array(np.repeat(np.array([
                ("StaticLayer" if spec.preallocated else
                 "DynamicSlidingWindowLayer" if lim > 0 else "DynamicLayer") for lim in limit]), steps)),
            "k_shape": _shape_array(batch, heads, held_flat, k_dim),
            "v_shape": _shape_array(batch, heads, held_flat, v_dim),
            "k_dtype": pa.array(np.repeat(np.array(dtypes), steps)),
            "v_dtype": pa.array(np.repeat(np.array(dtypes), steps)),
            "k_bytes": pa.array(k_bytes.reshape(-1)),
            "v_bytes": pa.array(v_bytes.reshape(-1)),
            "kv_bytes": pa.array(kv_layer.reshape(-1)),
            "aliased": pa.array(np.zeros(n, dtype=bool)),
            "stored_tokens": pa.array(flat_stored.astype(np.int64)),
            "capacity_tokens": pa.array(capacity.reshape(-1)) if capacity is not None else pa.nulls(n, pa.int64()),
        })
        writer.write_table("layers", layers)

        def gpu(values: np.ndarray) -> pa.Array:
            return pa.array(values.astype(np.int64)) if on_gpu else pa.nulls(steps, pa.int64())

        steps_table = pa.table({
            "run_id": pa.array([meta.run_id] * steps),
            "gen_id": pa.array(np.full(steps, gen, dtype=np.int32)),
            "step": pa.array(step_idx.astype(np.int32)),
            "t_ns": pa.array(t_ns.astype(np.int64)),
            "seq_len": pa.array(seq_len.astype(np.int64)),
            "batch_size": pa.array(np.full(steps, batch, dtype=np.int32)),
            "kv_bytes": pa.array(kv_total.astype(np.int64)),
            "allocated_bytes": gpu(allocated),
            "reserved_bytes": gpu(reserved),
            "active_bytes": gpu(allocated),
            "inactive_split_bytes": gpu(inactive_split),
            "alloc_retries": gpu(retries),
            "num_ooms": gpu(np.zeros(steps, dtype=np.int64)),
            "nvml_used_bytes": gpu(nvml_used),
            "nvml_total_bytes": gpu(np.full(steps, spec.total_memory_bytes, dtype=np.int64)),
            "kv_logical_bytes": pa.array((k_bytes + v_bytes).sum(axis=0).astype(np.int64)),
            "recorder_ns": pa.array(rng.integers(50_000, 120_000, steps).astype(np.int64)),
        })
        if spec.devices:
            _write_devices(writer, spec, meta.run_id, gen, step_idx, kv_layer, activation_bytes, context_bytes,
                           retained_by_device, leak_fraction=spec.retention)
        writer.write_table("steps", steps_table)

        peak_alloc = int(allocated.max())
        final_kv = int(kv_total[-1])
        leak = int(math.floor(spec.retention * (peak_alloc - baseline_alloc)))
        base_reserved = ((baseline_alloc + 2 * MIB - 1) // (2 * MIB)) * (2 * MIB)
        base_nvml = base_reserved + context_bytes + nvml_extra
        nvml_extra += warmup
        post_release_alloc = baseline_alloc + leak
        post_empty_reserved = ((post_release_alloc + 2 * MIB - 1) // (2 * MIB)) * (2 * MIB)
        readings = {
            "baseline": (baseline_alloc, base_reserved, base_nvml),
            "peak": (peak_alloc, int(reserved.max()), int(nvml_used.max())),
            "post_return": (baseline_alloc + final_kv, int(reserved[-1]), int(nvml_used[-1])),
            "post_release": (post_release_alloc, int(reserved[-1]), int(nvml_used[-1])),
            "post_empty_cache": (post_release_alloc, post_empty_reserved,
                                 post_empty_reserved + context_bytes + nvml_extra),
        }
        retained += leak
        row: dict[str, object] = {
            "run_id": meta.run_id, "gen_id": gen, "prompt_id": f"synthetic-{gen}",
            "prompt_tokens": spec.prompt_tokens, "new_tokens": steps, "eos_reached": False,
            "cache_class": "StaticCache" if spec.preallocated else "DynamicCache",
            "started_ns": started, "ended_ns": int(t_ns[-1]), "batch_size": batch,
        }
        for point, (alloc, res, nvml) in readings.items():
            row[f"{point}_allocated_bytes"] = alloc if on_gpu else None
            row[f"{point}_reserved_bytes"] = res if on_gpu else None
            row[f"{point}_nvml_used_bytes"] = nvml if on_gpu else None
        for key, value in row.items():
            gen_rows.setdefault(key, []).append(value)
    writer.extend("generations", gen_rows)
    writer.close()
    return path


def _write_devices(writer: TraceWriter, spec: SynthSpec, run_id: str, gen: int, step_idx: np.ndarray,
                   kv_layer: np.ndarray, activation_bytes: int, context_bytes: int, retained: dict[str, int], *,
                   leak_fraction: float) -> None:
    """layer_devices and device_steps rows of a model split over `spec.devices` (one generation).

    Each device holds its layers' weights and cache, an equal share of the activations and its own
    CUDA context; step -1 is the baseline, step -2 the reading after the cache was released (the
    planted retention on `retention_device`, else on every device in proportion)."""
    assert spec.devices is not None
    owner = spec.device_of_layers()
    writer.extend("layer_devices", {"run_id": [run_id] * spec.num_layers, "gen_id": [gen] * spec.num_layers,
                                    "layer": list(range(spec.num_layers)), "device": owner})
    totals = spec.device_memory_bytes or tuple(spec.total_memory_bytes for _ in spec.devices)
    columns: dict[str, list[object]] = {c: [] for c in (
        "run_id", "gen_id", "step", "device", "kv_bytes", "layers", "allocated_bytes", "reserved_bytes",
        "inactive_split_bytes", "nvml_used_bytes", "nvml_total_bytes")}

    def add(step: int, device: str, kv: int, layers: int, allocated: int, total: int) -> None:
        reserved = ((allocated + 2 * MIB - 1) // (2 * MIB)) * (2 * MIB) + 8 * MIB
        for key, value in (("run_id", run_id), ("gen_id", gen), ("step", step), ("device", device), ("kv_bytes", kv),
                           ("layers", layers), ("allocated_bytes", allocated), ("reserved_bytes", reserved),
                           ("inactive_split_bytes", 1 * MIB), ("nvml_used_bytes", reserved + context_bytes),
                           ("nvml_total_bytes", total)):
            columns[key].append(value)

    for device, total in zip(spec.devices, totals, strict=True):
        mine = np.array([o == device for o in owner])
        weights = spec.weights_bytes * int(mine.sum()) // spec.num_layers
        kv = kv_layer[mine].sum(axis=0).astype(np.int64)
        base = weights + retained.get(device, 0)
        add(-1, device, 0, int(mine.sum()), base, total)
        for step in step_idx:
            add(int(step), device, int(kv[step]), int(mine.sum()),
                base + activation_bytes // len(spec.devices) + int(kv[step]), total)
        planted = spec.retention_device in (None, device)
        leak = int(leak_fraction * (activation_bytes // len(spec.devices) + int(kv.max()))) if planted else 0
        retained[device] = retained.get(device, 0) + leak
        add(-2, device, 0, int(mine.sum()), base + leak, total)
    writer.extend("device_steps", columns)
