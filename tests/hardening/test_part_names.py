"""Glob characters in part names are literal: no reader of kvscope double-counts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kvscope.analyzer.load import load_traces

Cli = Callable[..., tuple[int, str, str]]


@pytest.mark.parametrize("name", ["part-*.parquet", "part-[ab].parquet", "part-?.parquet", "part-**.parquet",
                                  "part-{a,b}.parquet"])
def test_glob_characters_in_part_names(trace: Path, cli: Cli, name: str) -> None:
    part = next((trace / "layers").glob("part-*.parquet"))
    shutil.move(part, trace / "layers" / name)
    # the trace's other layers part (part-<hex>.parquet) is what the name would match as a glob
    with load_traces([trace]) as t:
        assert t.num_rows("layers") == 64
        assert t.sql("SELECT count(*) FROM layers") == [(64,)]
        assert t.lazy("layers").collect().height == 64
    code, out, err = cli("sql", trace, "SELECT count(*) AS n FROM layers", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 64}], err
    code, out, _ = cli("inspect", trace, "--format", "json")
    assert code == 0 and json.loads(out)["tables"]["layers"]["rows"] == 64


def test_glob_characters_in_the_trace_path(tmp_path: Path, trace: Path, cli: Cli) -> None:
    odd = tmp_path / "run[1]*?"
    shutil.copytree(trace, odd)
    code, out, err = cli("sql", odd, "SELECT count(*) AS n FROM layers", "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 64}], err
