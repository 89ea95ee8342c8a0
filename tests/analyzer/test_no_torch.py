"""The analyser never imports torch: it must work where torch cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, Blocker())
"""


def test_analyzer_imports_and_runs_without_torch(synth) -> None:  # noqa: ANN001
    trace = synth(odd_layer=1)
    code = BLOCKER + f"""
import kvscope.analyzer
from kvscope.analyzer.registry import known_names
from kvscope.cli.main import main
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the blocker failed")
assert len(known_names()) >= 8
rc = main(["analyze", {str(trace)!r}, "--format", "json", "--fail-on", "warning"])
assert "torch" not in sys.modules
raise SystemExit(10 + rc)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent)
    assert result.returncode == 11, result.stderr
    assert '"layer_anomaly"' in result.stdout
