"""`kvscope analyze|sql|tune|fleet --engine spark`: the same output as DuckDB; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from spark_helpers import rounded

from kvscope.cli.main import main
from kvscope.trace.synth_fleet import build_fleet


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    build_fleet(root, 12)  # a leak (3), fragmentation (7), an odd layer (11), preallocation (1), superlinear (5)
    return root


def _json(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_analyze_tune_and_fleet_print_the_same_on_spark(small: Path, spark: Any,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["analyze", str(small), "--format", "json-verdict"],
                 ["fleet", str(small), "--by", "model", "--format", "json"]):
        assert rounded(_json([*args, "--engine", "spark"], capsys)) == rounded(_json(args, capsys)), args
    labels = small / "labels.csv"
    labels.write_text("run_id,expected\nrun-00003,1\nrun-00000,0\nrun-00002,0\n")
    tune = ["tune", str(small), "--labels", str(labels), "-d", "post_eos", "--param", "live_threshold",
            "--range", "0.05:0.5:0.05", "--format", "json"]
    assert _json([*tune, "--engine", "spark"], capsys) == _json(tune, capsys)


def test_sql_on_spark_reads_the_views_and_nothing_else(small: Path, spark: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    query = "SELECT run_id, count(*) AS n, max(kv_bytes) AS peak FROM layers GROUP BY run_id ORDER BY run_id"
    rows = _json(["sql", str(small), query, "--format", "json", "--engine", "spark"], capsys)
    assert rows == _json(["sql", str(small), query, "--format", "json"], capsys) and len(rows) == 12
    for bad in ("SELECT reflect('java.lang.System', 'getenv', 'HOME')",
                "SELECT * FROM parquet.`/etc/passwd`", "SELECT 1; SELECT 2", "DROP VIEW layers",
                "SELECT nope FROM layers"):
        assert main(["sql", str(small), bad, "--engine", "spark"]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("kvscope: error:") and len(err.strip().splitlines()) == 1, err
