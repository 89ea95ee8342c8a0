from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from analyzer_helpers import detect, layer_rows, merge, run_row, step_rows, write_part


def _trace(tmp_path: Path, layer_kv: dict[int, list[int]], seq: list[int], totals: list[int] | None = None,
           stored: dict[int, list[int]] | None = None, layer_type: dict[int, str] | None = None) -> Path:
    write_part(tmp_path, "run", run_row())
    steps = list(range(len(seq)))
    write_part(tmp_path, "layers", merge(*(
        layer_rows("r1", 0, steps, layer, kv, (stored or {}).get(layer, seq),
                   (layer_type or {}).get(layer, "full_attention"))
        for layer, kv in layer_kv.items())))
    write_part(tmp_path, "steps", step_rows("r1", 0, seq, totals or [sum(v[i] for v in layer_kv.values())
                                                                     for i in steps]))
    return tmp_path


def test_linear_growth_gives_no_finding(tmp_path: Path) -> None:
    seq = list(range(64, 192))
    trace = _trace(tmp_path, {i: [2048 * s for s in seq] for i in range(4)}, seq)
    assert detect(trace, "growth_curve") == []


def test_one_quadratic_layer_and_the_total_are_flagged(tmp_path: Path) -> None:
    seq = list(range(10, 50))
    kv = {i: [100 * s for s in seq] for i in range(3)}
    kv[3] = [100 * s + 5 * (s - 10) ** 2 for s in seq]
    findings = detect(_trace(tmp_path, kv, seq), "growth_curve")
    assert [(f.severity, f.gen_id, f.layer, f.metric) for f in findings] == [
        ("critical", 0, 3, "marginal_rate_ratio"), ("warning", 0, None, "marginal_rate_ratio")]
    layer, total = findings
    # the three linear layers dilute the total's curvature: first quarter ~450, last ~790 bytes/token
    assert total.value == pytest.approx(1.7, abs=0.1)
    # 100 x + 5 x² over the decode steps 1..39: least-squares slope 155 over steps 1..10, 445 over 30..39
    assert layer.value == pytest.approx(445 / 155)
    assert layer.threshold == 1.25
    assert layer.evidence["r2_quadratic"] == pytest.approx(1.0)
    assert "superlinear" in layer.message


def test_a_cache_copied_every_step_is_flagged_although_its_r2_gain_is_tiny(tmp_path: Path) -> None:
    # detectors.md: 200-token prompt, 400 new tokens, a copy of the cache kept every step
    tokens = np.arange(200, 601)
    totals = (tokens + np.concatenate([[0], np.cumsum(tokens[1:])])) * 1024
    trace = _trace(tmp_path, {0: [int(t) * 1024 for t in tokens]}, tokens.tolist(), totals.astype(int).tolist())
    findings = detect(trace, "growth_curve")
    assert [(f.layer, f.metric) for f in findings] == [(None, "marginal_rate_ratio")]
    assert findings[0].evidence["r2_gain"] == pytest.approx(0.0164, abs=0.001)
    assert findings[0].value == pytest.approx(2.19, abs=0.02)
    # the original rule alone (gain > 0.05) misses it
    assert detect(trace, "growth_curve", ratio_threshold=1e9) == []


def test_sliding_layer_saturates_and_is_never_superlinear(tmp_path: Path) -> None:
    seq = list(range(16, 400))
    sliding = [min(s, 127) for s in seq]
    trace = _trace(tmp_path, {0: [2048 * s for s in sliding], 1: [2048 * s for s in seq]}, seq,
                   stored={0: sliding}, layer_type={0: "sliding_attention"})
    findings = detect(trace, "growth_curve")
    assert [(f.severity, f.layer, f.metric, f.value) for f in findings] == [("info", 0, "saturated_tokens", 127)]
    assert "saturated at 127 tokens" in findings[0].message


def test_a_sliding_layer_holding_the_prompt_at_the_prefill_is_not_superlinear(tmp_path: Path) -> None:
    # the H200 recording of a gpt-oss-20b twin, a 349-token prompt and 48 new tokens: at step 0 the
    # sliding layer's cache is a view of the whole prompt's storage (657,920 bytes), from step 1 on
    # the window's 127 tokens (261,888 bytes); the full layer grows linearly
    seq = list(range(349, 397))
    sliding = [657_920] + [261_888] * (len(seq) - 1)
    full = [2048 * s for s in seq]
    trace = _trace(tmp_path, {0: sliding, 1: full}, seq, stored={0: [127] * len(seq), 1: seq},
                   layer_type={0: "sliding_attention"})
    assert [f for f in detect(trace, "growth_curve") if f.severity != "info"] == []


def test_the_verdicts_growth_rate_is_read_over_decode_steps(tmp_path: Path) -> None:
    # the same recorded pattern: fitted over every step, the drop after the prefill halves the rate
    # (1,038 bytes per token); the cache grows by the full layer's 2 KiB per token
    from kvscope.analyzer import load_traces
    from kvscope.analyzer.run_facts import run_facts

    seq = list(range(349, 397))
    sliding = [657_920] + [261_888] * (len(seq) - 1)
    trace = _trace(tmp_path, {0: sliding, 1: [2048 * s for s in seq]}, seq, stored={0: [127] * len(seq), 1: seq},
                   layer_type={0: "sliding_attention"})
    with load_traces([trace]) as tables:
        (facts,) = run_facts(tables)
    assert facts.bytes_per_token == pytest.approx(2048.0)


def test_the_verdicts_growth_rate_is_per_sequence(tmp_path: Path) -> None:
    # a batch of 3: the cache grows 3 x 2 KiB per step; the rate quoted is the sequence's 2 KiB
    from analyzer_helpers import layer_rows, run_row, step_rows, write_part

    from kvscope.analyzer import load_traces
    from kvscope.analyzer.run_facts import run_facts

    seq = list(range(64, 128))
    write_part(tmp_path, "run", run_row(layer_types=["full_attention"]))
    write_part(tmp_path, "layers", layer_rows("r1", 0, list(range(len(seq))), 0, [3 * 2048 * s for s in seq], seq))
    write_part(tmp_path, "steps", step_rows("r1", 0, seq, [3 * 2048 * s for s in seq], batch=3))
    with load_traces([tmp_path]) as tables:
        (facts,) = run_facts(tables)
    assert facts.bytes_per_token == pytest.approx(2048.0) and facts.batch_size == 3


def test_thresholds_are_config_fields(tmp_path: Path) -> None:
    seq = list(range(10, 50))
    kv = {0: [100 * s + (s - 10) ** 2 for s in seq]}
    trace = _trace(tmp_path, kv, seq)
    assert {f.layer for f in detect(trace, "growth_curve")} == {0, None}
    assert detect(trace, "growth_curve", ratio_threshold=50.0, gain_threshold=0.9) == []
    assert [f.layer for f in detect(trace, "growth_curve", check_totals=False)] == [0]
