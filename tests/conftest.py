"""Shared fixtures: small synthetic traces built through the real writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvscope.trace.synth import SynthSpec, build_synthetic_trace


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    """A healthy 4-layer, 2-generation, 32-step synthetic trace."""
    return build_synthetic_trace(tmp_path / "trace", SynthSpec(num_layers=4, generations=2, steps=32))
