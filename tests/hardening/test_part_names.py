"""Glob characters in part names are literal: no reader of kvscope double-counts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hardening_helpers import one_line_error

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
        assert t.rows("SELECT count(*) FROM layers") == [(64,)]
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


def test_unreadable_table_folder(trace: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000 on a table folder (simulated: the tests may run as root, who reads it anyway)."""
    import os

    real = os.listdir
    layers = str(trace / "layers")

    def listdir(path: object = ".") -> list[str]:
        if str(path) == layers:
            raise PermissionError(13, "Permission denied", layers)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    for args in (("inspect", trace), ("sql", trace, "SELECT 1"), ("analyze", trace)):
        code, _out, err = cli(*args)
        assert code == 2 and "Permission denied" in one_line_error(err) and "layers" in err


def test_chmod_000_as_a_user(trace: Path, cli: Cli) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 folder")
    os.chmod(trace / "layers", 0)
    try:
        code, _out, err = cli("inspect", trace)
        assert code == 2 and "permission denied" in one_line_error(err)
    finally:
        os.chmod(trace / "layers", 0o755)
