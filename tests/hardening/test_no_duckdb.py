"""`kvscope inspect` runs where duckdb cannot be imported (a GPU host): the same checks, in memory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name in ("duckdb", "polars") or name.startswith(("duckdb.", "polars.")):
            raise ImportError(name + " is blocked in this test")
        return None
sys.meta_path.insert(0, Blocker())
from kvscope.cli.main import main
rc = main(["inspect", sys.argv[1]])
assert "duckdb" not in sys.modules
sys.exit(rc)
"""


def test_inspect_without_duckdb(trace: Path, tmp_path: Path) -> None:
    bad = shutil.copytree(trace, tmp_path / "bad")
    part = next((bad / "steps").glob("part-*.parquet"))
    data = pq.read_table(part)
    i = data.schema.get_field_index("step")
    data = data.set_column(i, data.schema.field(i), pa.array([3] * data.num_rows, pa.int32()))
    pq.write_table(data, part)
    ok = subprocess.run([sys.executable, "-c", BLOCK, str(trace)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    result = subprocess.run([sys.executable, "-c", BLOCK, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "more than once" in result.stdout, result.stdout + result.stderr
