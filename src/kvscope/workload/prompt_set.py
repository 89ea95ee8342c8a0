"""Prompts for `kvscope record`: a JSONL file of prompt objects (or strings), or the built-in set."""

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
    """Prompts from `path` (JSONL: one object per line with "text" or "prompt" and an optional "id"
    or "prompt_id", or one JSON string per line), or the built-in 15 structured prompts of graded
    lengths (24 to 6144 characters)."""
    if path is None:
        text = (resources.files("kvscope.workload") / "prompts" / BUILTIN).read_text()
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
        if isinstance(item, str):
            item = {"text": item}
        body = item.get("text", item.get("prompt")) if isinstance(item, dict) else None
        if not isinstance(body, str):
            raise UsageError(f'{source} line {number} needs a string, or an object with a "text" (or "prompt") string.')
        prompt_id = item.get("id", item.get("prompt_id", f"prompt-{number}"))
        prompts.append(Prompt(str(prompt_id), body))
    if not prompts:
        raise UsageError(f"{source} holds no prompts.")
    return prompts[:limit] if limit else prompts
