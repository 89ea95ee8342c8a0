"""Prompts for `kvscope record`: a JSONL file of {"id", "text"} objects, or the built-in set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvscope.errors import UsageError

BUILTIN = "default.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts from `path` (JSONL, one object per line with "text" and optional "id"), or the
    built-in 15 structured prompts of graded lengths (24 to 6144 characters)."""
    if path is None:
        text = (resources.files("kvscope.recorder") / "prompts" / BUILTIN).read_text()
        source = f"built-in {BUILTIN}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read prompts file {path}: {exc.strerror}.") from exc
        source = str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source} line {number} is not JSON ({exc.msg}).") from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise UsageError(f'{source} line {number} needs an object with a "text" string.')
        prompts.append(Prompt(str(item.get("id", f"prompt-{number}")), item["text"]))
    if not prompts:
        raise UsageError(f"{source} holds no prompts.")
    return prompts[:limit] if limit else prompts
