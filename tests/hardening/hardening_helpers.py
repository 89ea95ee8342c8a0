"""Helpers of the hardening tests."""

from __future__ import annotations


def one_line_error(err: str) -> str:
    """The one error line of a command's stderr (asserts there is exactly one and no traceback)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), err
    return lines[0]
