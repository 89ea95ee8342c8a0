"""The benchmark's reference query computes what docs/benchmarks.md says it computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_analyzer.py"


def test_reference_query_r2_of_linear_and_quadratic_fits(synth) -> None:  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("bench_analyzer", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trace = synth(num_layers=4, layer_types=("sliding_attention", "full_attention") * 2, sliding_window=64,
                  prompt_tokens=8, generations=2, steps=100)
    _, rows = bench.reference_rows(trace)
    assert len(rows) == 2 * 4  # one row per (run, generation, layer)
    for _run, _gen, _layer, r2_lin, r2_quad in rows:  # bytes are exactly linear in stored tokens
        assert r2_lin == pytest.approx(1.0) and r2_quad == pytest.approx(1.0)
    assert bench.build(trace, 2, 100) == 2 * 4 * 100
