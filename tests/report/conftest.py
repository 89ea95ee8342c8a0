"""Fixtures of the report tests: named synthetic traces (healthy, leaking, fragmented) in one folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvscope.trace.synth import SynthSpec, build_synthetic_trace

SPECS = {
    "healthy": SynthSpec(run_id="healthy", generations=3, model_name="llama-like"),
    "leaking": SynthSpec(run_id="leaking", generations=3, retention=0.3, model_name="llama-like"),
    "fragmented": SynthSpec(run_id="fragmented", generations=3, fragmentation=True, model_name="llama-like"),
}


@pytest.fixture
def named_traces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The three traces under tmp_path/traces, with tmp_path as the working directory (stable paths)."""
    monkeypatch.chdir(tmp_path)
    return {name: build_synthetic_trace(tmp_path / "traces" / name, spec) for name, spec in SPECS.items()}
