"""Small things a user trips over: diff as a CI gate, tune on a threshold that changes nothing, sql tables,
t.sql() and kvscope.sql() with column names."""

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
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at its width
    assert "post_eos.info_threshold changes nothing here: every value from 0.05 to 0.5 gives the same " \
           "predictions (tp 1, fp 0, fn 0, tn 1)" in out
    assert main([*base, "--param", "info_threshold", "--range", "0.05:0.5:0.15", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes_nothing"] is True
    # live_threshold decides a single generation's retention (a leak repeated over generations is
    # flagged by the repeated rule at any live_threshold, so r40's predictions would not move)
    single = build_synthetic_trace(tmp_path / "single", SynthSpec(run_id="r40one", retention=0.4, generations=1))
    one_labels = tmp_path / "one.csv"
    one_labels.write_text("run_id,expected\nr0,0\nr40one,1\n")
    one = ["tune", str(pair["r0"]), str(single), "--labels", str(one_labels), "-d", "post_eos"]
    assert main([*one, "--param", "live_threshold", "--range", "0.1:0.5:0.2"]) == 0
    assert "changes nothing" not in capsys.readouterr().out
    assert main([*one, "--param", "live_threshold", "--range", "0.1:0.5:0.2", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes_nothing"] is False
    assert main([*base, "--param", "live_threshold", "--range", "0.1:0.5:0.2"]) == 0
    assert "post_eos.live_threshold changes nothing here" in " ".join(capsys.readouterr().out.split())


def test_diff_fail_on_gates_on_new_findings_in_b(pair: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    healthy, leaky, odd = (str(pair[k]) for k in ("r0", "r40", "odd"))
    assert main(["diff", healthy, leaky, "--fail-on", "critical"]) == 1  # the leak is new in B
    assert "1 new critical-or-worse finding(s) in B (post_eos)" in capsys.readouterr().err
    assert main(["diff", leaky, healthy, "--fail-on", "critical"]) == 0  # fixed in B: no regression
    assert main(["diff", healthy, odd, "--fail-on", "critical", "--format", "json"]) == 0  # a warning only
    assert main(["diff", healthy, odd, "--fail-on", "warning", "--format", "json"]) == 1
    assert main(["diff", healthy, odd]) == 0  # no gate without --fail-on
    assert main(["diff", healthy, odd, "--fail-on", "warning", "--min-severity", "critical"]) == 2


def test_sql_table_right_aligns_and_rounds(pair: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    query = ("SELECT * FROM (VALUES ('short', 413773.3333, 0.884900412, 1234567), ('a longer name', 5.5, 12.0, 7)) "
             "AS t(name, tokens_to_oom, fraction, bytes)")
    assert main(["sql", str(pair["r0"]), query]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "short" in line or "longer" in line]
    assert len(rows) == 2 and all(len(line) <= 80 for line in lines)
    assert "413,773" in rows[0] and "0.8849" in rows[0] and "1,234,567" in rows[0]
    assert "5.5" in rows[1] and " 12 " in rows[1] + " "
    # right-aligned: the numbers of both rows end in the same column
    for a, b in (("413,773", "5.5"), ("0.8849", "12"), ("1,234,567", "7")):
        assert rows[0].index(a) + len(a) == rows[1].index(b) + len(b)
    header = next(line for line in lines if "tokens_to_oom" in line or "tokens_to" in line)
    assert "name" in header


def test_sql_from_python_has_column_names(pair: dict[str, Path]) -> None:
    import pyarrow as pa

    import kvscope
    from kvscope.errors import UsageError

    query = "SELECT run_id, count(*) AS n, max(kv_bytes) AS peak FROM steps GROUP BY run_id ORDER BY run_id"
    table = kvscope.sql([pair["r0"], pair["odd"]], query)
    assert isinstance(table, pa.Table) and table.column_names == ["run_id", "n", "peak"]
    assert table.column("run_id").to_pylist() == ["odd", "r0"] and table.column("n").to_pylist() == [128, 128]
    frame = kvscope.sql(str(pair["r0"]), query, to="polars")
    assert frame.columns == ["run_id", "n", "peak"] and frame["peak"].to_list() == table.column("peak").to_pylist()[1:]
    with pytest.raises(UsageError, match="the query failed"):
        kvscope.sql(pair["r0"], "SELECT nope FROM steps")
    with pytest.raises(UsageError, match="to must be"):
        kvscope.sql(pair["r0"], query, to="pandas")  # type: ignore[arg-type]


def test_loaded_traces_sql_has_column_names(pair: dict[str, Path]) -> None:
    import pyarrow as pa

    from kvscope.analyzer.load import load_traces
    from kvscope.errors import UsageError

    query = "SELECT run_id, count(*) AS n FROM steps GROUP BY run_id ORDER BY run_id"
    with load_traces([pair["r0"], pair["odd"]]) as t:
        table = t.sql(query)
        assert isinstance(table, pa.Table) and table.to_pylist() == [{"run_id": "odd", "n": 128},
                                                                    {"run_id": "r0", "n": 128}]
        assert t.sql(query, to="polars").columns == ["run_id", "n"]
        assert t.rows(query) == [("odd", 128), ("r0", 128)]  # tuples, for code that unpacks
        with pytest.raises(UsageError, match="to must be"):
            t.sql(query, to="pandas")


def test_an_output_file_that_cannot_be_written_is_a_usage_error(pair: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """-o inside a path whose 'folder' is a file: one line, exit 2, for every command that writes a file
    (it was an internal error, exit 3, for report and export); nothing half-written is left."""
    trace = str(pair["r0"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = str(blocker / "out")
    for args in (["report", trace, "-o", target], ["export", trace, "--perfetto", "-o", target],
                 ["sql", trace, "SELECT 1 AS a", "-o", target], ["sql", trace, "SELECT 1 AS a", "--format", "csv",
                                                                 "-o", target]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"kvscope: error: -o {target}: cannot write it"), (args, err)
    assert main(["report", trace, "-o", str(tmp_path / "no-such-folder" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sql", trace, "SELECT 1 AS a", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "odd", "r0", "r40"]


def test_an_output_folder_that_cannot_be_created_is_a_usage_error(pair: dict[str, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """record, ppl, lab and redact write folders: one below a file is a one-line exit 2 before any work
    (it was an internal error, exit 3), and nothing is created."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = str(blocker / "out")
    for args in (["record", "--twin", "pythia-1.4b", "--shrink", "-o", target, "--device", "cpu"],
                 ["ppl", "--twin", "pythia-1.4b", "--shrink", "-o", target, "--device", "cpu"],
                 ["lab", "-o", target], ["redact", str(pair["r0"]), "-o", target]):
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("kvscope")]
        assert len(err) == 1 and f"{blocker} is a file, not a folder" in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "odd", "r0", "r40"]
