"""Shared fixtures: small synthetic traces built through the real writer."""

from __future__ import annotations

import os
from pathlib import Path

# Triton decides between compiling and interpreting when a kernel module is first imported, and
# tests of other folders (the CLI, the lab) may import the kernels before tests/kernels runs: set
# the interpreter here, before any test module loads (GPU runs set KVSCOPE_GPU_TESTS=1 to compile).
if os.environ.get("KVSCOPE_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kvscope.trace.synth import SynthSpec, build_synthetic_trace


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    """A healthy 4-layer, 2-generation, 32-step synthetic trace."""
    return build_synthetic_trace(tmp_path / "trace", SynthSpec(num_layers=4, generations=2, steps=32))
