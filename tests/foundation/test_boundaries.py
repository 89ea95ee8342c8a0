"""Import boundaries: the analyser side never needs torch; the recorder never needs polars/duckdb."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def _import_without(modules: list[str], blocked: set[str]) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(BLOCKER.format(blocked=blocked)) + "".join(f"import {m}\n" for m in modules)
    code += f"assert not any(m.split('.')[0] in {blocked!r} for m in sys.modules), sorted(sys.modules)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_schema_trace_and_cli_import_without_torch() -> None:
    result = _import_without(["kvscope", "kvscope.schema", "kvscope.trace", "kvscope.trace.synth",
                              "kvscope.trace.inspect", "kvscope.cli.main"], {"torch", "transformers", "triton"})
    assert result.returncode == 0, result.stderr


def test_schema_and_inspect_need_only_pyarrow() -> None:
    result = _import_without(["kvscope.schema", "kvscope.trace.reader", "kvscope.trace.inspect"],
                             {"torch", "polars", "duckdb", "transformers"})
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("kvscope.analyzer") is None, reason="no analyzer package yet")
def test_analyzer_imports_without_torch() -> None:
    result = _import_without(["kvscope.analyzer"], {"torch", "transformers", "triton"})
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the recorder needs torch")
def test_recorder_imports_without_polars_or_duckdb() -> None:
    result = _import_without(["kvscope.recorder"], {"polars", "duckdb"})
    assert result.returncode == 0, result.stderr
