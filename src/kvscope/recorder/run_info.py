"""The `run` row: where, with what and on which model a recording was made."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from kvscope.recorder.allocator import memory_limit
from kvscope.recorder.model_layout import ModelLayout, text_config
from kvscope.recorder.nvml import NvmlProbe
from kvscope.schema.metadata import TraceMetadata


def _config_dict(config: Any) -> dict[str, Any]:
    try:
        data = config.to_dict()
    except Exception:  # noqa: BLE001 - a config that cannot serialise still gets recorded by name
        return {"model_type": getattr(config, "model_type", None)}
    return _finite(json.loads(json.dumps(data, default=str)))


def _finite(value: Any) -> Any:
    """Non-finite floats as strings: JSON has no Infinity (mamba2 / bamba / falcon_h1 configs hold
    `time_step_limit = (0.0, inf)`), and a trace must stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf", "nan"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def distributed_job() -> tuple[str | None, int | None, int | None]:
    """(job_id, rank, world_size) of a torch.distributed job with more than one process, else Nones.

    The job id is what torchrun gives every rank alike (TORCHELASTIC_RUN_ID), else
    KVSCOPE_JOB_ID, else the rendezvous address: the ranks' runs are then read as one job."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None, None, None
    world = dist.get_world_size()
    if world < 2:
        return None, None, None
    env = os.environ
    job = env.get("TORCHELASTIC_RUN_ID") or env.get("KVSCOPE_JOB_ID") or \
        f"{env.get('MASTER_ADDR', 'localhost')}:{env.get('MASTER_PORT', '')}"
    return job, dist.get_rank(), world


def run_metadata(model: torch.nn.Module, layout: ModelLayout, model_name: str | None, labels: dict[str, str],
                 tokenizer: str | None, options: dict[str, Any], nvml: NvmlProbe) -> TraceMetadata:
    try:
        import transformers

        transformers_version: str | None = str(transformers.__version__)
    except ImportError:
        transformers_version = None
    config = model.config
    name = model_name or getattr(config, "_name_or_path", None) or type(model).__name__
    gpu_name = torch.cuda.get_device_name(layout.cuda_devices[0]) if layout.cuda_devices else None
    options = dict(options)
    if layout.sliding_window is not None:
        options.setdefault("sliding_window", layout.sliding_window)
    if layout.kv_lora_rank is not None:
        options.setdefault("kv_lora_rank", layout.kv_lora_rank)
    limit_bytes, limit = memory_limit(layout.cuda_devices, nvml.total)
    if limit is not None:
        options.setdefault("memory_limit", limit)
    elif isinstance(options.get("memory_limit_bytes"), int):  # a cap this torch cannot report, given by the caller
        limit_bytes = options["memory_limit_bytes"]
    cfg = text_config(config)
    if cfg is not config:
        options.setdefault("text_model_type", getattr(cfg, "model_type", None))
    return TraceMetadata(
        model_name=str(name),
        model_type=layout.model_type,
        num_layers=layout.num_layers,
        layer_types=list(layout.layer_types),
        dtype=layout.dtype,
        device=layout.device,
        model_config=_config_dict(config),
        attn_implementation=layout.attn_implementation,
        labels=labels,
        torch_version=str(torch.__version__),  # a TorchVersion would make the writer process import torch
        transformers_version=transformers_version,
        gpu_name=gpu_name,
        driver_version=nvml.driver_version,
        tokenizer=tokenizer,
        options=options,
        nvml_total_bytes=nvml.total,
        memory_limit_bytes=limit_bytes,
        **dict(zip(("job_id", "rank", "world_size"), distributed_job(), strict=True)),
    )
