"""The weight variants `kvscope ppl --quantize` compares, each applied to a copy of the loaded model.

| name | what | package |
|---|---|---|
| `none` | the model as loaded (the reference every delta is taken against) | - |
| `int8` | torchao `Int8WeightOnlyConfig`: int8 weights, a scale per output channel, activations as loaded | torchao |
| `int8-quanto` | optimum-quanto `qint8` weights (`quantize` then `freeze`) | optimum-quanto |
| `int8-bnb` | bitsandbytes LLM.int8() (`Linear8bitLt`, outlier threshold 6.0): what the published Gemma/Pythia study used | bitsandbytes |

Every variant quantizes the linear layers of the model except its output embedding (`lm_head`),
as transformers' bitsandbytes integration does; the input embedding and norms stay as loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvscope.errors import UsageError
from kvscope.ppl.models import require


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    module: str | None  # the package it needs (None: nothing)
    pip: str | None
    apply: Callable[[torch.nn.Module, str], torch.nn.Module]  # (a model on the CPU, device) -> ready model


def _output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _linear_names(model: torch.nn.Module) -> list[str]:
    head = _output_embedding(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def _none(model: torch.nn.Module, device: str) -> torch.nn.Module:
    return model.to(device)


def _torchao(model: torch.nn.Module, device: str) -> torch.nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = model.to(device)
    keep = set(_linear_names(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in keep)
    return model


def _quanto(model: torch.nn.Module, device: str) -> torch.nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    model = model.to(device)
    head = _output_embedding(model)
    exclude = [name for name, module in model.named_modules() if module is head and name]
    quantize(model, weights=qint8, exclude=exclude or None)
    freeze(model)
    return model


class OncePerMessage(logging.Filter):
    """Let each distinct message through once: bitsandbytes logs "MatMul8bitLt: inputs will be cast
    from torch.bfloat16 to float16" on every matmul of a bf16 model (32,390 lines for one 20 K-character
    run of a Gemma 4 twin on the H200), which buries the progress and the table."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"


def quiet_repeated_bnb_warnings() -> None:
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    if not any(isinstance(f, OncePerMessage) for f in logger.filters):
        logger.addFilter(OncePerMessage())


def _bnb(model: torch.nn.Module, device: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    quiet_repeated_bnb_warnings()

    for name in _linear_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        replacement = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          has_fp16_weights=False, threshold=6.0)
        replacement.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            replacement.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        setattr(parent, child, replacement)
    return model.to(device)  # Int8Params quantize as they move to the device (CPU too, bitsandbytes >= 0.45)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("none", "native weights (as loaded)", None, None, _none),
    Variant("int8", "torchao Int8WeightOnlyConfig (int8 weights, per-channel scales)", "torchao",
            "pip install 'torchao>=0.18'", _torchao),
    Variant("int8-quanto", "optimum-quanto qint8 weights", "optimum.quanto", "pip install optimum-quanto", _quanto),
    Variant("int8-bnb", "bitsandbytes LLM.int8() (Linear8bitLt, threshold 6.0)", "bitsandbytes",
            "pip install bitsandbytes", _bnb),
)}


def parse_variants(spec: str) -> list[Variant]:
    """`none,int8,...` -> the variants, `none` first (added when missing: deltas are taken against it);
    UsageError for an unknown name or a missing package (with the pip command)."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise UsageError("--quantize: give one or more of " + ", ".join(VARIANTS) + ".")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UsageError(f"--quantize {','.join(unknown)}: unknown; known: {', '.join(VARIANTS)}.")
    ordered = ["none", *[name for name in dict.fromkeys(names) if name != "none"]]
    variants = [VARIANTS[name] for name in ordered]
    for variant in variants:
        if variant.module is not None and variant.pip is not None:
            require(variant.module.split(".")[0] if variant.module != "optimum.quanto" else "optimum",
                    variant.pip, f"--quantize {variant.name}")
            if variant.module == "optimum.quanto":
                require("optimum.quanto", variant.pip, f"--quantize {variant.name}")
    return variants


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, each storage counted once (tied embeddings),
    quantized tensor subclasses counted by their inner tensors (int8 data, scales, zero points)."""
    seen: set[tuple[str, int]] = set()

    def count(tensor: torch.Tensor) -> int:
        flatten = getattr(tensor, "__tensor_flatten__", None)
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and callable(flatten):
            names, _ = flatten()
            return sum(count(getattr(tensor, name)) for name in names)
        total = 0
        scb = getattr(tensor, "SCB", None)  # bitsandbytes Int8Params: the per-row scales live beside the data
        if isinstance(scb, torch.Tensor):
            total += count(scb)
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key, size = (str(tensor.device), id(tensor)), tensor.numel() * tensor.element_size()
        if key in seen:
            return total
        seen.add(key)
        return total + size

    tensors = [p for p in model.parameters()] + [b for b in model.buffers()]
    return sum(count(t.data if isinstance(t, torch.nn.Parameter) and type(t) is torch.nn.Parameter else t)
               for t in tensors)
