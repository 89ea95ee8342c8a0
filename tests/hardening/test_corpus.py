"""The acceptance corpus: every hostile trace gives a one-line exit-2 error naming the file and the
problem from inspect, analyze, sql and diff, or is read correctly; no traceback, nothing written
outside, within time. The corpus is built by scripts/make_hostile_traces.py in a temporary folder."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
from hardening_helpers import load_script

from kvscope.cli.main import main
from kvscope.trace import duck

corpus = load_script("make_hostile_traces")

NAMES = [c.name for c, _ in corpus.CASES]


def test_corpus_is_large_enough() -> None:
    assert len(NAMES) >= 60 and len(set(NAMES)) == len(NAMES)
    assert sum(c.expect == "error" for c, _ in corpus.CASES) >= 45


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    return {c.name: (c, p) for c, p in corpus.build_corpus(root)}


def _tree(path: Path) -> set[tuple[str, int]]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            try:
                out.add((full, os.lstat(full).st_size if name in filenames else -1))
            except OSError:
                out.add((full, -2))
    return out


def _top(root: Path) -> set[str]:
    return set(os.listdir(root))


@pytest.mark.parametrize("name", NAMES)
def test_hostile_trace(name: str, built: dict[str, tuple[object, Path]], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if name not in built:
        pytest.skip("needs a non-root user (root reads a chmod 000 folder)")
    case, path = built[name]
    base = path.parent / "base"
    monkeypatch.chdir(tmp_path)  # where a stray COPY ... TO 'relative' would land
    before, top = _tree(path), _top(path.parent)
    scratches: list[Path] = []
    real_init = duck.Scratch.__init__

    def tracked_init(self: duck.Scratch) -> None:
        real_init(self)
        scratches.append(self.path)

    monkeypatch.setattr(duck.Scratch, "__init__", tracked_init)
    started = time.monotonic()
    commands = {
        "inspect": ["inspect", path],
        "analyze": ["analyze", path, "--format", "json"],
        "sql": ["sql", path, "SELECT count(*) AS n FROM layers", "--format", "csv"],
        "diff": ["diff", path, base, "--format", "json"],
    }
    for command, args in commands.items():
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and "internal error" not in err, (command, err)
        if case.expect == "error":
            assert code == 2, (command, code, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), (command, err)
            named = out + err if command == "inspect" else lines[0]
            assert case.match in named, (command, case.match, named[-2000:])
            assert str(path) in named or path.name in named, (command, named[-500:])
        else:
            assert code == 0, (command, err)
            if command == "sql":
                assert out.splitlines() == ["n", str(case.layers)], out
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    assert _tree(path) == before and _top(path.parent) == top, "a command wrote or removed something"
    assert list(tmp_path.iterdir()) == [], "a command wrote into the working directory"
    assert not [p for p in scratches if p.exists()], "a DuckDB spill folder was left behind"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 * 1024 * 1024  # KiB: under 2 GiB


@pytest.mark.parametrize("name", NAMES)
def test_compact_on_hostile_trace(name: str, built: dict[str, tuple[object, Path]], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`kvscope compact` writes into a trace: on each case it either works or refuses in one line, never
    touches anything outside the trace, and leaves a trace that reads the same rows as before."""
    if name not in built:
        pytest.skip("needs a non-root user")
    import shutil

    case, source = built[name]
    work = tmp_path / "w"
    work.mkdir()
    path = shutil.copytree(source, work / name, symlinks=True)
    outside = _tree(source.parent / "base")
    code = main(["compact", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("kvscope: error: "), err
    assert _tree(source.parent / "base") == outside
    if name == "hostile_compaction_journal":  # refused: no real part deleted on a journal's word
        assert code == 2 and len(list((path / "layers").glob("part-*.parquet"))) == 2
    if code == 0 and case.expect == "ok":
        assert main(["sql", str(path), "SELECT count(*) AS n FROM layers", "--format", "csv"]) == 0
        rows = corpus.BASE_LAYERS if name == "interrupted_compaction" else case.layers  # undone: all rows back
        assert capsys.readouterr().out.splitlines() == ["n", str(rows)]


def test_in_memory_and_duckdb_checks_agree(built: dict[str, tuple[object, Path]]) -> None:
    """The checks across rows give the same errors in DuckDB and in memory (hosts without duckdb)."""
    from kvscope.trace.invariants import InvariantReport, _check_in_memory, check_invariants
    from kvscope.trace.reader import open_trace

    compared = 0
    for name in ("base", "null_run_id", "stray_run_id", "duplicate_run_rows", "negative_kv_bytes",
                 "negative_stored_tokens", "duplicate_step", "negative_step", "t_ns_backwards", "layers_without_steps",
                 "missing_generations_row"):
        path = built[name][1] if name in built else next(iter(built.values()))[1].parent / "base"
        trace = open_trace(path)
        in_memory = InvariantReport()
        _check_in_memory(trace, in_memory)
        with_duckdb = check_invariants(trace)
        assert in_memory.errors == with_duckdb.errors, name
        assert bool(in_memory.warnings) == bool(with_duckdb.warnings), name
        compared += 1
    assert compared == 11
