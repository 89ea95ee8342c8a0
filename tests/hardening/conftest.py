"""Fixtures of the hardening tests: a small valid trace to mutate, and the CLI as a function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvscope.cli.main import main
from kvscope.trace.synth import SynthSpec, build_synthetic_trace


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """A healthy 2-layer, 2-generation, 16-step synthetic trace."""
    return build_synthetic_trace(tmp_path / "trace", SynthSpec(num_layers=2, generations=2, steps=16))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `kvscope ARGS...`; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
