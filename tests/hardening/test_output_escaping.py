"""Strings from a trace never reach the terminal as escapes or markup, and are capped when shown."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kvscope.trace.synth import SynthSpec, build_synthetic_trace
from kvscope.trace.text import clean

Cli = Callable[..., tuple[int, str, str]]

HOSTILE = [
    "\x1b[2J\x1b[H" + "\x1b]0;pwned\x07",  # clear screen, window title
    "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\" + "\u202eevil\u202c" + "line\nbreak\rcr",  # OSC 8, bidi
    "[/]" + "[bold red]shout[/bold red][link=https://evil.example]x[/link]",  # rich markup
]


def _raw_control(text: str) -> bool:
    return any((ord(c) < 32 and c not in "\n") or c in "\x7f\u202e\u202c\x9b" for c in text)


@pytest.mark.parametrize("evil", HOSTILE)
def test_inspect_diff_analyze_escape(tmp_path: Path, cli: Cli, evil: str) -> None:
    spec = SynthSpec(num_layers=2, steps=8, model_name=f"model{evil}", model_type=f"type{evil}",
                     run_id=f"run{evil}", labels={"note": evil, evil: "key"},
                     layer_types=("full_attention", f"sliding{evil}"), sliding_window=4)
    a = build_synthetic_trace(tmp_path / "a", spec)
    b = shutil.copytree(a, tmp_path / "b")
    for args in (("inspect", a), ("diff", a, b, "--min-severity", "info"), ("analyze", a),
                 ("analyze", a, "--format", "markdown"), ("sql", a, "SELECT * FROM run")):
        code, out, err = cli(*args)
        assert code == 0, (args, err)
        assert not _raw_control(out) and not _raw_control(err), (args, out)
        assert "shout" not in out or "[bold red]" in out  # markup shown literally, never applied
        if evil.startswith("[") and args[0] == "inspect":
            assert f"model{evil}" in out  # shown literally


def test_long_strings_are_capped(tmp_path: Path, cli: Cli) -> None:
    a = build_synthetic_trace(tmp_path / "a", SynthSpec(num_layers=2, steps=8, model_name="m" * 2_000_000,
                                                         labels={"l": "x" * 1_000_000}))
    code, out, err = cli("inspect", a)
    assert code == 0, err
    assert len(out) < 20_000 and "more characters" in out
    code, out, err = cli("diff", a, a)
    assert code == 0 and len(out) < 20_000, err


def test_clean_escapes_every_control_character() -> None:
    text = "".join(chr(i) for i in range(0, 0x110)) + "\u200b\u2066\u2069\ud800"
    shown = clean(text, limit=0)
    assert not any(not (c.isprintable() or c == " ") for c in shown)
    assert "\\x1b" in shown and "\\u202e" in clean("\u202e") and clean("ok [x]") == "ok [x]"
