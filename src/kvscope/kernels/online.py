"""Online head statistics: every N forward passes, hand each layer's post-RoPE q and k to the kernels.

`HeadStatsCollector.install(model)` registers an attention implementation in transformers'
attention-function registry (``AttentionInterface``) that calls the model's own implementation
(sdpa, eager, flash, ...) unchanged and, on sampled steps, also computes per-head statistics of
the queries and of the keys and values the attention reads (the cache after its update): key and
value norms, mean attention entropy and low-mass fraction, with the same definitions as
`kvscope kernels` (``kvscope.kernels.offline``). No model-specific code: any architecture whose
attention goes through the registry works (transformers >= 4.48). Results stay on the device
until `drain()`, which returns head_stats columns with source "online".

Caveats: the keys are taken as given, so a preallocated (static) cache's unfilled slots count as
keys (use it with growing caches); the statistics are of the plain softmax of q·k, so learned
attention sinks (gpt-oss) are left out; the registration is process-wide, so install one collector
at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from kvscope.kernels import api
from kvscope.kernels.offline import DEFAULT_LOW_MASS, STAT_COLUMNS

IMPLEMENTATION = "kvscope_head_stats"
SOURCE = "online"


def _registry() -> Any:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError as exc:  # transformers < 4.48 has no attention-function registry
        raise RuntimeError("online head statistics need transformers >= 4.48 (AttentionInterface)") from exc
    return ALL_ATTENTION_FUNCTIONS, AttentionInterface


class HeadStatsCollector:
    """Computes head statistics inside attention every `every` forward passes of one model."""

    def __init__(self, every: int, *, run_id: str = "", low_mass_threshold: float = DEFAULT_LOW_MASS) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.run_id = run_id
        self.low_mass_threshold = low_mass_threshold
        self.gen_id = 0
        self.step = -1  # the forward pre-hook advances it to 0 at the prefill
        self._pending: list[tuple[tuple[Any, ...], str, torch.Tensor, int]] = []
        self._model: torch.nn.Module | None = None
        self._original: str | None = None
        self._hook: Any = None
        self._eager: dict[type, Callable[..., Any]] = {}

    # -- installation -------------------------------------------------------------------------------

    def install(self, model: torch.nn.Module) -> HeadStatsCollector:
        """Route the model's attention through the wrapper; `uninstall()` restores it."""
        if self._model is not None:
            raise RuntimeError("this collector is already installed on a model")
        _, interface = _registry()
        interface.register(IMPLEMENTATION, self._attention)
        self._original = getattr(model.config, "_attn_implementation", None) or "eager"
        self._model = model
        self._set_implementation(model, IMPLEMENTATION)
        self._hook = model.register_forward_pre_hook(self._advance)
        return self

    def uninstall(self) -> None:
        if self._model is None:
            return
        self._set_implementation(self._model, self._original or "eager")
        if self._hook is not None:
            self._hook.remove()
        self._model, self._hook = None, None

    def __enter__(self) -> HeadStatsCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @staticmethod
    def _set_implementation(model: torch.nn.Module, name: str) -> None:
        setter = getattr(model, "set_attn_implementation", None)
        if setter is not None:
            try:
                setter(name)
                return
            except (ValueError, ImportError, AttributeError):
                pass
        for module in model.modules():  # older releases: set the (sub-)configs directly
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name

    # -- positions -----------------------------------------------------------------------------------

    def begin_generation(self, gen_id: int) -> None:
        """Number the following forward passes from step 0 of generation `gen_id`."""
        self.gen_id = gen_id
        self.step = -1

    def _advance(self, *_: object) -> None:
        self.step += 1

    def sampling(self) -> bool:
        return self.step >= 0 and self.step % self.every == 0

    # -- the wrapped attention -----------------------------------------------------------------------

    def _wrapped_function(self, module: torch.nn.Module) -> Callable[..., Any]:
        name = self._original or "eager"
        if name != "eager":
            functions, _ = _registry()
            return functions[name]
        fn = self._eager.get(type(module))
        if fn is None:
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
            self._eager[type(module)] = fn
        return fn

    def _attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        result = self._wrapped_function(module)(module, query, key, value, attention_mask, **kwargs)
        if self.sampling():
            layer = getattr(module, "layer_idx", None)
            if layer is not None:
                window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
                with torch.no_grad():
                    self.observe(int(layer), query, key, value, scale=kwargs.get("scaling"), window=window)
        return result

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, *,
                scale: float | None = None, window: int | None = None) -> None:
        """Statistics of one layer's q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] at the current step."""
        pos = (self.run_id, self.gen_id, self.step, layer)
        tokens = key.shape[0] * key.shape[2]
        for prefix, x in (("key", key), ("value", value)):
            if x is None or x.dim() != 4 or not x.shape[2]:
                continue
            norms = api.head_norms(x).transpose(0, 1).reshape(x.shape[1], -1)
            self._pending.append((pos, f"{prefix}_norm_mean", norms.mean(dim=1), tokens))
            self._pending.append((pos, f"{prefix}_norm_max", norms.amax(dim=1), tokens))
        if query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1] or not key.shape[2]:
            return
        window = int(window) if window else None
        entropy, lse = api.attention_entropy(query, key, scale=scale, causal=True, window=window)
        self._pending.append((pos, "entropy_mean", entropy.mean(dim=(0, 2)), key.shape[2]))
        mass = api.attention_mass(query, key, scale=scale, causal=True, window=window, lse=lse, normalize=True)
        low = (mass < self.low_mass_threshold / key.shape[2]).float().mean(dim=(0, 2))
        self._pending.append((pos, "low_mass_fraction", low, key.shape[2]))

    # -- results -------------------------------------------------------------------------------------

    def drain(self) -> dict[str, list[Any]]:
        """The statistics gathered since the last drain, as head_stats columns (one device sync)."""
        columns: dict[str, list[Any]] = {c: [] for c in STAT_COLUMNS}
        pending, self._pending = self._pending, []
        for (run_id, gen_id, step, layer), stat, values, tokens in pending:
            for head, value in enumerate(values.float().cpu().tolist()):
                row = (run_id, gen_id, step, layer, head, stat, float(value), int(tokens), SOURCE)
                for name, item in zip(STAT_COLUMNS, row, strict=True):
                    columns[name].append(item)
        return columns
