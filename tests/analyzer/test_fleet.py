"""`kvscope fleet` on DuckDB: runs grouped by metadata or a label, the worst groups first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope.analyzer.fleet import fleet_view
from kvscope.analyzer.load import load_traces
from kvscope.cli.main import main
from kvscope.trace.synth_fleet import build_fleet, planted


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    build_fleet(root, 40)
    return root


def test_groups_rank_leaks_first_and_count_every_run(fleet: Path) -> None:
    with load_traces([fleet], validate=False) as tables:
        view = fleet_view(tables, ("host",))
    assert sum(g.runs for g in view.groups) == view.runs == 40
    top = view.groups[0]
    leaking = {f"gpu-{i % 20:02d}" for i in range(40) if "leak" in planted(i)}
    assert top.key[0] in leaking and top.severity == "critical" and top.retained_live_bytes > 0
    assert top.detectors.get("post_eos") == top.runs == top.critical_runs == 2
    assert top.first_action == "2026-11-01T03:00:00" or top.first_action == "2026-11-01T13:00:00"
    healthy = [g for g in view.groups if not any(planted(i) for i in range(40) if f"gpu-{i % 20:02d}" == g.key[0])]
    assert healthy and all(g.critical_runs == g.warning_runs == 0 and g.first_action is None for g in healthy)
    assert [g.severity for g in view.groups] == sorted((g.severity for g in view.groups),
                                                      key=("critical", "warning", "info").index)


def test_fleet_cli_by_label_and_metadata(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", str(fleet), "--by", "variant", "--by", "transformers", "--format", "json",
                 "--no-validate"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["by"] == ["variant", "transformers"] and view["runs"] == 40
    assert {tuple(g["key"]) for g in view["groups"]} == {(v, t) for v in ("bf16", "int8")
                                                        for t in ("4.57.6", "5.17.0", "5.24.0")}
    assert main(["fleet", str(fleet), "--by", "nolabel", "--format", "json", "--no-validate"]) == 0
    assert [g["key"] for g in json.loads(capsys.readouterr().out)["groups"]] == [["(none)"]]
    assert main(["fleet", str(fleet), "--top", "3", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "40 runs by host" in out and "more group(s)" in out


@pytest.mark.parametrize("args", [["fleet"], ["fleet", "{fleet}", "--top", "0"], ["fleet", "{fleet}/missing"],
                                  ["fleet", "{fleet}", "--master", "local[2]"],
                                  ["analyze", "{fleet}", "--master", "local[2]"],
                                  ["sql", "{fleet}", "SELECT 1", "--master", "local[2]"],
                                  ["analyze", "{fleet}", "--engine", "spark", "--threads", "2"]])
def test_bad_input_is_one_line_and_exit_2(args: list[str], fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(fleet=fleet) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("error" in err.lower()), err


def test_an_unknown_engine_is_a_usage_error(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", str(fleet), "--engine", "flink"]) == 2
    assert "'flink' is not one of 'duckdb', 'spark'" in capsys.readouterr().err
