"""`kvscope kernels TRACE`: per-head statistics from a trace's kv_samples, appended to head_stats.

Each sampled (run, generation, step, layer) gives, per kv head, the mean and max L2 norm of its
keys and values over the batch and tokens; with a query sample, the mean attention entropy per
query head and, per kv head, the fraction of keys whose mean attention probability (normalised by
the queries that can see them) is below `low_mass_threshold` times a uniform share 1/Tk; with an
MLA latent (tensor "latent", or "k" of a layer of type "latent"), its effective rank and width.
Runs on the GPU when there is one, else on the CPU (the reference, or Triton's interpreter when
TRITON_INTERPRET=1). Rows carry source "offline".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from kvscope.errors import TraceError
from kvscope.kernels import api
from kvscope.trace.reader import Trace, open_trace
from kvscope.trace.writer import TraceWriter

SOURCE = "offline"
KEY_COLUMNS = ("run_id", "gen_id", "step", "layer")
STAT_COLUMNS = ("run_id", "gen_id", "step", "layer", "head", "stat", "value", "tokens", "source")
DEFAULT_LOW_MASS = 0.1


@dataclass(frozen=True)
class OfflineResult:
    """What one `compute_head_stats` call did."""

    samples: int  # (run, generation, step, layer) groups processed
    rows: int  # head_stats rows appended
    device: str
    backend: str
    replaced_parts: int


def decode_tensor(data: bytes, shape: list[int], dtype: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """A kv_samples row's raw little-endian bytes as a tensor of its shape and dtype."""
    torch_dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise TraceError(f"kv_samples: unknown dtype {dtype!r}")
    count = 1
    for n in shape:
        count *= int(n)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != count * itemsize:
        raise TraceError(f"kv_samples: {len(data)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    if count == 0:
        return torch.empty([int(n) for n in shape], dtype=torch_dtype, device=device)
    tensor = torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape([int(n) for n in shape])
    return tensor.to(device)


def _as_bhtd(x: torch.Tensor) -> torch.Tensor:
    """Samples are [B, H, T, D]; accept [H, T, D] and [T, D] by adding leading axes."""
    while x.dim() < 4:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise TraceError(f"kv_samples: expected a [B, H, T, D] tensor, got shape {list(x.shape)}")
    return x


def _sliding_windows(trace: Trace) -> tuple[dict[tuple[Any, ...], str], dict[str, int | None]]:
    """Layer type per (run, gen, step, layer) and the sliding window per run, when declared."""
    types: dict[tuple[Any, ...], str] = {}
    if trace.num_rows("layers"):
        layers = trace.read("layers", [*KEY_COLUMNS, "layer_type"]).to_pylist()
        types = {tuple(r[c] for c in KEY_COLUMNS): r["layer_type"] for r in layers}
    windows: dict[str, int | None] = {}
    for row in trace.read("run", ["run_id", "model_config"]).to_pylist():
        try:
            config = json.loads(row["model_config"] or "{}")
        except json.JSONDecodeError:
            config = {}
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        window = config.get("sliding_window") or text.get("sliding_window")
        windows[row["run_id"]] = int(window) if isinstance(window, (int, float)) and window > 0 else None
    return types, windows


def attention_settings(trace: Trace) -> dict[str, dict[int, dict[str, Any]]]:
    """Per run and layer, the logit scaling, softcap and window the model's attention uses.

    From the run's `options["attention"]` (what the recorder read off the attention modules), else
    from the config: Gemma 2/3 scale by query_pre_attn_scalar^-1/2 and cap logits with
    attn_logit_softcapping; otherwise 1/sqrt(head_dim) applies (and is what the kernels default to).
    """
    settings: dict[str, dict[int, dict[str, Any]]] = {}
    columns = ["run_id", "model_config", *(["options"] if trace.has_column("run", "options") else [])]
    for row in trace.read("run", columns).to_pylist():
        per_layer: dict[int, dict[str, Any]] = {}
        options = _json_object(row.get("options"))
        recorded = options.get("attention")
        if isinstance(recorded, dict):
            for layer, values in recorded.items():
                if isinstance(values, dict) and str(layer).isdigit():
                    per_layer[int(layer)] = {k: values.get(k) for k in ("scaling", "softcap", "sliding_window")}
        if not per_layer:
            config = _json_object(row.get("model_config"))
            text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
            scalar = text.get("query_pre_attn_scalar")
            cap = text.get("attn_logit_softcapping")
            default = {"scaling": float(scalar) ** -0.5 if isinstance(scalar, (int, float)) and scalar > 0 else None,
                       "softcap": float(cap) if isinstance(cap, (int, float)) and cap > 0 else None}
            per_layer = {-1: default}
        settings[row["run_id"]] = per_layer
    return settings


def _json_object(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except (json.JSONDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _layer_settings(settings: dict[str, dict[int, dict[str, Any]]], key: tuple[Any, ...]) -> dict[str, Any]:
    per_layer = settings.get(key[0], {})
    return per_layer.get(int(key[3]), per_layer.get(-1, {}))


def _groups(trace: Trace) -> Iterator[tuple[tuple[Any, ...], dict[str, dict[str, Any]]]]:
    """kv_samples rows grouped by (run, gen, step, layer), one part file at a time."""
    for part in trace.parts.get("kv_samples", []):
        data = pq.read_table(part.path, columns=[*KEY_COLUMNS, "tensor", "shape", "dtype", "data"])
        order = pc.sort_indices(data, [(c, "ascending") for c in KEY_COLUMNS])
        data = data.take(order)
        current: tuple[Any, ...] | None = None
        tensors: dict[str, dict[str, Any]] = {}
        for batch in data.to_batches(max_chunksize=64):
            for row in batch.to_pylist():
                key = tuple(row[c] for c in KEY_COLUMNS)
                if key != current and current is not None:
                    yield current, tensors
                    tensors = {}
                current = key
                tensors[row["tensor"]] = row
        if current is not None:
            yield current, tensors


class _Rows:
    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {c: [] for c in STAT_COLUMNS}

    def add(self, key: tuple[Any, ...], stat: str, values: list[float], tokens: int) -> None:
        for head, value in enumerate(values):
            for name, item in zip(STAT_COLUMNS, (*key, head, stat, float(value), int(tokens), SOURCE), strict=True):
                self.columns[name].append(item)

    def __len__(self) -> int:
        return len(self.columns["stat"])


def stats_for_sample(
    key: tuple[Any, ...], tensors: dict[str, torch.Tensor], rows: _Rows, *, layer_type: str | None,
    window: int | None, low_mass_threshold: float, scale: float | None = None, softcap: float | None = None,
) -> None:
    """Append the statistics of one (run, gen, step, layer) sample to `rows`."""
    latent = tensors.get("latent")
    if latent is None and layer_type == "latent":
        latent = tensors.get("k")
    if latent is not None:
        flat = latent.reshape(-1, latent.shape[-1])
        rows.add(key, "latent_effective_rank", [api.latent_effective_rank(flat)], flat.shape[0])
        rows.add(key, "latent_width", [float(flat.shape[-1])], flat.shape[0])
        return
    for name, prefix in (("k", "key"), ("v", "value")):
        if name in tensors:
            x = _as_bhtd(tensors[name])
            norms = api.head_norms(x)  # [B, H, T]
            tokens = x.shape[0] * x.shape[2]
            per_head = norms.transpose(0, 1).reshape(x.shape[1], -1)
            if per_head.shape[1]:
                rows.add(key, f"{prefix}_norm_mean", per_head.mean(dim=1).tolist(), tokens)
                rows.add(key, f"{prefix}_norm_max", per_head.amax(dim=1).tolist(), tokens)
    if "q" in tensors and "k" in tensors:
        q, k = _as_bhtd(tensors["q"]), _as_bhtd(tensors["k"])
        win = window if layer_type == "sliding_attention" else None
        entropy, lse = api.attention_entropy(q, k, scale=scale, causal=True, window=win, softcap=softcap)
        rows.add(key, "entropy_mean", entropy.mean(dim=(0, 2)).tolist(), k.shape[2])
        mass = api.attention_mass(q, k, scale=scale, causal=True, window=win, lse=lse, normalize=True,
                                  softcap=softcap)  # [B, Hkv, Tk]
        low = (mass < low_mass_threshold / max(k.shape[2], 1)).float().mean(dim=(0, 2))
        rows.add(key, "low_mass_fraction", low.tolist(), k.shape[2])


def _replace_offline_parts(trace: Trace) -> int:
    """Delete head_stats parts that hold only offline rows (an earlier run of this command)."""
    removed = 0
    for part in trace.parts.get("head_stats", []):
        sources = pc.unique(pq.read_table(part.path, columns=["source"])["source"]).to_pylist()
        if sources == [SOURCE]:
            Path(part.path).unlink()
            removed += 1
    return removed


def compute_head_stats(
    path: str | Path, *, device: str | None = None, low_mass_threshold: float = DEFAULT_LOW_MASS,
    replace: bool = False, progress: Callable[[int, int], None] | None = None,
) -> OfflineResult:
    """Compute head statistics from the trace's kv_samples and append them to its head_stats."""
    trace = open_trace(path)
    if not trace.num_rows("kv_samples"):
        raise TraceError(f"{trace.path}: the trace has no kv_samples (record with KV sampling on).")
    existing = trace.read("head_stats", ["source"])["source"] if trace.num_rows("head_stats") else None
    replaced = 0
    if existing is not None and SOURCE in pc.unique(existing).to_pylist():
        if not replace:
            raise TraceError(f"{trace.path}: head_stats already holds offline rows; pass --replace to recompute them.")
        replaced = _replace_offline_parts(trace)
        trace = open_trace(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    types, windows = _sliding_windows(trace)
    settings = attention_settings(trace)
    keys = trace.read("kv_samples", list(KEY_COLUMNS))
    total = len(keys.group_by(list(KEY_COLUMNS)).aggregate([]))
    rows = _Rows()
    done = 0
    backend = "reference"
    for key, samples in _groups(trace):
        tensors = {name: decode_tensor(r["data"], r["shape"], r["dtype"], dev) for name, r in samples.items()}
        if tensors:
            backend = api.backend_for(next(iter(tensors.values())))
        layer = _layer_settings(settings, key)
        stats_for_sample(key, tensors, rows, layer_type=types.get(key),
                         window=layer.get("sliding_window") or windows.get(key[0]),
                         low_mass_threshold=low_mass_threshold, scale=layer.get("scaling"),
                         softcap=layer.get("softcap"))
        done += 1
        if progress is not None:
            progress(done, total)
    with TraceWriter(trace.path) as writer:
        writer.extend("head_stats", rows.columns)
    return OfflineResult(done, len(rows), str(dev), backend, replaced)
