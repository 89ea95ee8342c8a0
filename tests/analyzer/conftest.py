"""Fixtures of the analyser tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvscope.trace.synth import SynthSpec, build_synthetic_trace


@pytest.fixture
def synth(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def build(**fields: Any) -> Path:
        return build_synthetic_trace(tmp_path / f"synth-{next(counter)}", SynthSpec(**fields))

    return build
