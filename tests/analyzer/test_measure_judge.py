"""Detectors in two halves: measure (SQL, no threshold) once, judge (pure Python) many times."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvscope.analyzer import load_traces
from kvscope.analyzer.detectors import layer_anomaly, preallocation_waste
from kvscope.analyzer.registry import get_detector, registry, with_value
from kvscope.analyzer.tune import Label, sweep


@pytest.fixture
def fleet(synth) -> list[Path]:  # noqa: ANN001
    return [synth(run_id="healthy", generations=2), synth(run_id="odd", generations=2, odd_layer=1),
            synth(run_id="leaky", generations=3, retention=0.3),
            synth(run_id="all", num_layers=4, layer_types=("sliding_attention", "full_attention") * 2,
                  sliding_window=32, prompt_tokens=8, generations=2, retention=0.3, fragmentation=True,
                  superlinear=True, odd_layer=1, undeclared_sliding=True, preallocated=True)]


def test_every_builtin_detector_is_split_into_measure_and_judge() -> None:
    for name, det in registry().items():
        if det.detect is None:
            assert det.split and det.measure is not None and det.judge is not None, name


@pytest.mark.parametrize("name", sorted(n for n, d in registry().items() if d.split))
def test_judge_is_pure_and_needs_no_engine(name: str, fleet: list[Path]) -> None:
    det = get_detector(name)
    with load_traces(fleet) as tables:
        expected = det.run(tables)
        measured = det.measured(tables)
        before = len(tables.queries)
        assert det.judged(measured) == expected
        assert len(tables.queries) == before  # judging ran no query
    # the connection is closed: judging still works from the measured rows alone, twice alike
    assert det.judged(measured) == expected == det.judged(measured)


def test_tune_measures_once_and_judges_each_value(fleet: list[Path]) -> None:
    det = get_detector("layer_anomaly")
    labels = [Label("odd", None, True), Label("healthy", None, False), Label("leaky", None, False)]
    with load_traces(fleet) as tables:
        det.measured(tables)
        measure_queries = len(tables.queries)
    values = [1.0 + 0.5 * i for i in range(12)]
    with load_traces(fleet) as tables:
        rows = sweep(tables, det, det.default_config(), "z_threshold", values, labels)
        # one query for the labels' run ids, then the detector's measure queries, once for 12 values
        assert len(tables.queries) == 1 + measure_queries
    assert [r.value for r in rows] == values
    assert rows[0].tp == 1 and rows[0].fp == 0


def test_tune_gives_the_findings_a_full_run_gives_at_each_value(fleet: list[Path]) -> None:
    det = get_detector("growth_curve")
    labels = [Label("all", None, True), Label("healthy", None, False)]
    values = [0.01, 0.05, 0.5, 5.0]
    with load_traces(fleet) as tables:
        swept = sweep(tables, det, det.default_config(), "ratio_threshold", values, labels)
        for value, row in zip(values, swept, strict=True):
            findings = det.run(tables, with_value(det.default_config(), "ratio_threshold", value))
            hit = {f.run_id for f in findings if f.at_least("warning")}
            assert row.tp == ("all" in hit) and row.fp == ("healthy" in hit)


def test_measure_sql_builds_no_values_list(fleet: list[Path]) -> None:
    with load_traces(fleet) as tables:
        for det in registry().values():
            det.measured(tables)
        assert tables.queries and not [q for q in tables.queries if "VALUES" in q.upper()]


def test_judges_take_hand_written_rows() -> None:
    row = {"run_id": "r", "gen_id": 0, "layers": 4, "capacity": 4096, "stored": 512, "ratio": 8.0,
           "wasted": 7 << 20, "kv_bytes": 8 << 20, "max_capacity": 1024, "max_stored": 128}
    (finding,) = preallocation_waste.judge(preallocation_waste.Measured([row]), preallocation_waste.Config())
    assert (finding.metric, finding.value, finding.threshold) == ("capacity_ratio", 8.0, 2.0)
    assert preallocation_waste.judge(preallocation_waste.Measured([row]), preallocation_waste.Config(max_ratio=9)) == []
    assert preallocation_waste.judge(preallocation_waste.Measured([{**row, "wasted": 1}]),
                                     preallocation_waste.Config()) == []

    peers = [{"run_id": "r", "gen_id": 0, "layer": i, "layer_type": "full_attention", "k_dtype": "bfloat16",
              "kv_bytes": 100, "stored_tokens": 10, "bpt": bpt, "med": 10.0, "mad": 0.0, "peers": 4, "dev": 0.0}
             for i, bpt in enumerate((10.0, 10.0, 10.0, 20.0))]
    (odd,) = layer_anomaly.judge(layer_anomaly.Measured(peers), layer_anomaly.Config())
    assert odd.layer == 3 and odd.value == pytest.approx(100.0)  # scale floored at 1% of the median
    assert layer_anomaly.judge(layer_anomaly.Measured(peers), layer_anomaly.Config(min_layers=5)) == []
    assert layer_anomaly.judge(layer_anomaly.Measured(peers), layer_anomaly.Config(z_threshold=101)) == []


def test_measured_rows_are_frozen_dataclasses(fleet: list[Path]) -> None:
    with load_traces(fleet[:1]) as tables:
        for name, det in registry().items():
            if det.split:
                measured = det.measured(tables)
                assert dataclasses.is_dataclass(measured), name
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(measured, dataclasses.fields(measured)[0].name, None)
