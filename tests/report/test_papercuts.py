"""Small things a user trips over: diff as a CI gate, tune on a threshold that changes nothing, sql tables,
t.sql() with column names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope.cli.main import main
from kvscope.trace.synth import SynthSpec, build_synthetic_trace


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, Path]:
    return {name: build_synthetic_trace(tmp_path / name, spec) for name, spec in {
        "r0": SynthSpec(run_id="r0"), "r40": SynthSpec(run_id="r40", retention=0.4, generations=3),
        "odd": SynthSpec(run_id="odd", odd_layer=1)}.items()}


def test_tune_says_when_the_parameter_changes_nothing(pair: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("run_id,expected\nr0,0\nr40,1\n")
    base = ["tune", str(pair["r0"]), str(pair["r40"]), "--labels", str(labels), "-d", "post_eos"]
    # info_threshold only moves info findings: the warning-or-worse predictions stay the same
    assert main([*base, "--param", "info_threshold", "--range", "0.05:0.5:0.15"]) == 0
    out = capsys.readouterr().out
    assert "post_eos.info_threshold changes nothing here: every value from 0.05 to 0.5 gives the same " \
           "predictions (tp 1, fp 0, fn 0, tn 1)" in out
    assert main([*base, "--param", "info_threshold", "--range", "0.05:0.5:0.15", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes_nothing"] is True
    assert main([*base, "--param", "live_threshold", "--range", "0.1:0.5:0.2"]) == 0
    assert "changes nothing" not in capsys.readouterr().out
    assert main([*base, "--param", "live_threshold", "--range", "0.1:0.5:0.2", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes_nothing"] is False


def test_diff_fail_on_gates_on_new_findings_in_b(pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    healthy, leaky, odd = (str(pair[k]) for k in ("r0", "r40", "odd"))
    assert main(["diff", healthy, leaky, "--fail-on", "critical"]) == 1  # the leak is new in B
    assert "1 new critical-or-worse finding(s) in B (post_eos)" in capsys.readouterr().err
    assert main(["diff", leaky, healthy, "--fail-on", "critical"]) == 0  # fixed in B: no regression
    assert main(["diff", healthy, odd, "--fail-on", "critical", "--format", "json"]) == 0  # a warning only
    assert main(["diff", healthy, odd, "--fail-on", "warning", "--format", "json"]) == 1
    assert main(["diff", healthy, odd]) == 0  # no gate without --fail-on
    assert main(["diff", healthy, odd, "--fail-on", "warning", "--min-severity", "critical"]) == 2
