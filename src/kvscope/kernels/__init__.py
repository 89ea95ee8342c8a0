"""Analysis kernels over KV caches: per-head norms, streaming attention entropy and mass, MLA latents.

``import kvscope.kernels`` imports neither torch nor triton: the torch-based functions load on
first use, so torch-free modules of this package (``mla``, ``headstats``) serve the analyser.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = ("head_norms", "attention_entropy", "attention_mass", "as_bias", "gram", "latent_effective_rank", "backend_for")

__all__ = [*_API, "mla_compression_ratio", "erank_from_eigenvalues", "is_mla_config"]

from kvscope.kernels.mla import erank_from_eigenvalues, is_mla_config, mla_compression_ratio  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("kvscope.kernels.api"), name)
    raise AttributeError(f"module 'kvscope.kernels' has no attribute {name!r}")
