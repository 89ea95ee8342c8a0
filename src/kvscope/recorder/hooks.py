"""Where a forward pass's cache and input size are found, and the attention-module hooks.

The step hook sits on the model that `generate` calls; the cache comes from its output
(``past_key_values``, or ``cache`` in 5.24), else from the keyword it was called with. Attention
modules are hooked during a generation's first step to find the cache whatever keyword they
receive (``past_key_value`` ≤4.55, ``past_key_values`` 4.56–5.23, ``cache`` 5.24, ``layer_past``
in GPT-NeoX-style models); once the model's output is known to carry it they are removed, so
later steps pay for one hook only.
"""

from __future__ import annotations

from typing import Any

import torch

from kvscope.recorder.cache_walk import RwkvState

CACHE_KEYWORDS = ("past_key_values", "cache", "past_key_value", "layer_past")
# `cache_params`: mamba / falcon_mamba / mamba2 on 4.x (their MambaCache); `state`: rwkv's five state tensors.
CACHE_OUTPUT_ATTRS = ("cache", "past_key_values", "cache_params", "state")


def _is_cache(value: Any) -> bool:
    if value is None or isinstance(value, torch.Tensor):
        return False
    if isinstance(value, (tuple, list)):
        return bool(value) and isinstance(value[0], (tuple, list, torch.Tensor))
    return True


def cache_from_output(output: Any, name: str | None = None) -> tuple[Any, str | None]:
    """The cache a model output carries, and the attribute it was found under.

    With `name` (found at an earlier step) that attribute is read first: a missing attribute
    costs an exception, and this runs every step.
    """
    if name is not None:
        value = getattr(output, name, None)
        if _is_cache(value):
            return (RwkvState(value) if name == "state" else value), name
    for attr in CACHE_OUTPUT_ATTRS:
        try:
            value = getattr(output, attr, None)
        except (AttributeError, KeyError):
            value = None
        if _is_cache(value):
            if attr == "state":
                if not isinstance(value, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in value):
                    continue
                return RwkvState(list(value)), attr
            return value, attr
    return None, None


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    for name in CACHE_KEYWORDS:
        value = kwargs.get(name)
        if _is_cache(value):
            return value
    return None


def batch_and_tokens(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(batch size, tokens processed) of a forward call: decoder_input_ids (encoder-decoder models),
    input_ids or inputs_embeds."""
    ids = kwargs.get("decoder_input_ids")
    if ids is None:
        ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if isinstance(ids, torch.Tensor):
        shape = ids.shape
        if len(shape) >= 2:
            return shape[0], shape[1]
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 3:
        return embeds.shape[0], embeds.shape[1]
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:
        return 1, ids.shape[0]
    return 1, 1


class AttentionDiscovery:
    """Hooks on attention modules that note the cache object they were called with."""

    def __init__(self, modules: list[tuple[int, torch.nn.Module]]) -> None:
        self.modules = modules
        self.handles: list[Any] = []
        self.cache: Any = None  # dropped by the step hook at the end of each step
        self.layers_seen: set[int] = set()

    @property
    def installed(self) -> bool:
        return bool(self.handles)

    def install(self) -> None:
        if self.handles:
            return
        for index, module in self.modules:
            self.handles.append(module.register_forward_hook(self._hook(index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.cache = None

    def _hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            self.layers_seen.add(index)
            if self.cache is None:
                found = cache_from_kwargs(kwargs)
                # A tuple here is one layer's (k, v) past, not the whole cache: the model's output
                # carries the presents in that (legacy) case.
                if found is not None and not isinstance(found, (tuple, list)):
                    self.cache = found
        return hook
