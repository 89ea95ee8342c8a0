"""analyze, sql, tune and diff through kvscope.cli.main.main (exit codes) and their outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kvscope.analyzer.findings import FINDING_FIELDS
from kvscope.cli.main import main

FIELD_TYPES = {"detector": (str,), "severity": (str,), "run_id": (str,), "gen_id": (int, type(None)),
               "layer": (int, type(None)), "metric": (str,), "value": (int, float),
               "threshold": (int, float, type(None)), "message": (str,)}


@pytest.fixture
def traces(synth) -> dict[str, Path]:  # noqa: ANN001
    return {"healthy": synth(run_id="healthy", generations=2),
            "leaky": synth(run_id="leaky", generations=3, retention=0.3),
            "odd": synth(run_id="odd", generations=2, odd_layer=1)}


def test_analyze_json_validates_against_the_findings_fields(traces: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(traces["leaky"]), str(traces["odd"]), "--format", "json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert isinstance(findings, list) and findings
    for f in findings:
        for name in FINDING_FIELDS:
            assert isinstance(f[name], FIELD_TYPES[name]), (name, f)
        assert f["severity"] in ("info", "warning", "critical")
    flagged = {(f["run_id"], f["detector"], f["severity"]) for f in findings if f["severity"] != "info"}
    assert flagged == {("leaky", "post_eos", "critical"), ("odd", "layer_anomaly", "warning")}


def test_fail_on_exit_codes(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    healthy, leaky, odd = (str(traces[k]) for k in ("healthy", "leaky", "odd"))
    assert main(["analyze", healthy, "--fail-on", "warning", "--format", "json"]) == 0
    assert main(["analyze", odd, "--fail-on", "warning", "--format", "json"]) == 1
    assert main(["analyze", odd, "--fail-on", "critical", "--format", "json"]) == 0
    assert main(["analyze", leaky, "--fail-on", "critical", "--format", "json"]) == 1
    assert main(["analyze", leaky, "--fail-on", "critical", "-d", "layer_anomaly", "--format", "json"]) == 0
    assert main(["analyze", leaky, "--fail-on", "critical", "--set", "post_eos.live_threshold=0.5"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(Path(healthy).parent / "missing")]) == 2
    assert main(["analyze", healthy, "--detector", "kv_leak"]) == 2
    assert "known detectors" in capsys.readouterr().err
    assert main(["analyze", healthy, "--set", "post_eos.nope=1"]) == 2
    assert main(["analyze", healthy, "--fail-on", "sometimes"]) == 2


def test_analyze_text_and_markdown(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(traces["odd"])]) == 0
    out = capsys.readouterr().out
    assert "layer_anomaly" in out and "finding(s)" in out
    assert main(["analyze", str(traces["odd"]), "--format", "markdown", "-d", "layer_anomaly"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| severity | detector |") and len(lines) == 4  # header, rule, two generations


def test_sql_formats(traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    healthy, odd = str(traces["healthy"]), str(traces["odd"])
    query = "SELECT run_id, count(*) AS n FROM layers GROUP BY run_id ORDER BY run_id"
    assert main(["sql", healthy, odd, query, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"run_id": "healthy", "n": 1024}, {"run_id": "odd", "n": 1024}]
    assert main(["sql", healthy, query, "--format", "csv"]) == 0
    assert list(csv.reader(capsys.readouterr().out.splitlines())) == [["run_id", "n"], ["healthy", "1024"]]
    assert main(["sql", healthy, query]) == 0
    assert "healthy" in capsys.readouterr().out
    out = tmp_path / "r.parquet"
    assert main(["sql", healthy, odd, query, "--format", "parquet", "-o", str(out)]) == 0
    assert pq.read_table(out).to_pylist() == [{"run_id": "healthy", "n": 1024}, {"run_id": "odd", "n": 1024}]
    assert main(["sql", healthy, query, "--format", "parquet"]) == 2
    assert main(["sql", healthy, "SELECT nope FROM layers"]) == 2


def test_tune_prints_precision_recall_f1_and_marks_the_best(synth, tmp_path: Path,  # noqa: ANN001
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    runs = {f"r{int(r * 100)}": synth(run_id=f"r{int(r * 100)}", retention=r) for r in (0.0, 0.05, 0.2, 0.4)}
    labels = tmp_path / "labels.csv"
    labels.write_text("run_id,gen_id,expected\nr0,,0\nr5,,0\nr20,0,1\nr40,,1\n")
    args = ["tune", *map(str, runs.values()), "--labels", str(labels), "--detector", "post_eos",
            "--param", "live_threshold", "--range", "0.01:0.5:0.1"]
    assert main([*args, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {round(r["value"], 2): r for r in result["rows"]}
    assert list(rows) == [0.01, 0.11, 0.21, 0.31, 0.41]
    assert (rows[0.01]["tp"], rows[0.01]["fp"], rows[0.01]["precision"], rows[0.01]["recall"]) == (2, 1, 2 / 3, 1.0)
    assert (rows[0.11]["tp"], rows[0.11]["fp"], rows[0.11]["f1"]) == (2, 0, 1.0)
    assert (rows[0.21]["tp"], rows[0.21]["fn"], rows[0.21]["recall"]) == (1, 1, 0.5)
    assert rows[0.41]["f1"] == 0.0
    assert [v for v, r in rows.items() if r["best"]] == [0.11]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best: live_threshold = 0.11" in out and "*" in out
    labels.write_text("run_id,expected\nunknown,1\n")
    assert main(args) == 2
    assert main([*args[:-1], "0.5:0.1:0.1"]) == 2


def test_diff_reports_layer_and_finding_changes(synth, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    bf16 = synth(run_id="bf16")
    fp32 = synth(run_id="fp32", dtype="float32", odd_layer=2)
    assert main(["diff", str(bf16), str(fp32), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    changes = [round(row["change"], 3) for row in result["layers"]]
    assert changes == [1.0, 1.0, 3.0, 1.0]
    assert result["only_in_a"] == []
    assert [(f["detector"], f["layer"]) for f in result["only_in_b"]] == [("layer_anomaly", 2)]
    peak = next(m for m in result["metrics"] if m["metric"] == "peak_kv_bytes")
    assert peak["change"] == pytest.approx(1.5)
    assert main(["diff", str(bf16), str(fp32)]) == 0
    assert "only in B" in capsys.readouterr().out


def test_click_runner_sees_the_same_exit_codes(traces: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from kvscope.cli.main import cli

    runner = CliRunner()
    odd = str(traces["odd"])
    assert runner.invoke(cli, ["analyze", odd, "--fail-on", "warning", "--format", "json"]).exit_code == 1
    assert runner.invoke(cli, ["analyze", odd, "--fail-on", "critical", "--format", "json"]).exit_code == 0
    bad = runner.invoke(cli, ["analyze", odd, "-d", "kv_leak"])
    assert bad.exit_code == 2 and "known detectors" in bad.output
    assert runner.invoke(cli, ["sql", odd, "SELECT 1 AS one", "--format", "csv"]).output == "one\n1\n"
    assert runner.invoke(cli, ["diff", odd, str(traces["healthy"]), "--format", "json"]).exit_code == 0


def test_analyze_lists_detectors_and_filters_by_severity(traces: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--list"]) == 0
    out = capsys.readouterr().out
    assert "preallocation_waste" in out and "ratio_threshold=1.25" in out
    assert main(["analyze", str(traces["odd"]), "--min-severity", "warning", "--format", "json"]) == 0
    assert {f["severity"] for f in json.loads(capsys.readouterr().out)} == {"warning"}
    assert main(["analyze"]) == 2
