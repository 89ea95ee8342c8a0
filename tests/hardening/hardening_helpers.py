"""Helpers of the hardening tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def one_line_error(err: str) -> str:
    """The one error line of a command's stderr (asserts there is exactly one and no traceback)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), err
    return lines[0]


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (registered in sys.modules, so its dataclasses can be pickled)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
