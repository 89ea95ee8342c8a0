"""Text from a trace made safe to show: no terminal escapes, no rich markup, bounded length.

A trace is untrusted input: a model name or a label may hold ESC sequences (clear the screen,
set the window title, OSC 8 links), bidirectional overrides, or rich markup such as `[/]`.
`clean` replaces every control and format character with a visible escape and caps the length;
`markup` additionally escapes rich markup, for text printed inside a markup string.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# The most characters of one value shown in a terminal (the JSON outputs are not capped).
MAX_SHOWN = 200


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: Any, limit: int = MAX_SHOWN) -> str:
    """`value` as text with control/format characters escaped and at most `limit` characters kept."""
    text = value if isinstance(value, str) else str(value)
    more = len(text) - limit if limit and len(text) > limit else 0
    if more:
        text = text[:limit]
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif unicodedata.category(ch) in ("Zs",):
            out.append(" ")
        else:  # Cc (ESC, BEL, CR, ...), Cf (bidi overrides, zero-width), Cs (lone surrogates), Zl, Zp
            out.append(_escape_char(ch))
    result = "".join(out)
    return f"{result}... ({more:,} more characters)" if more else result


def markup(value: Any, limit: int = MAX_SHOWN) -> str:
    """`clean(value)` with rich markup escaped, for use inside a rich markup string."""
    from rich.markup import escape

    return escape(clean(value, limit))


def clean_strings(obj: Any, limit: int = 500) -> Any:
    """A copy of `obj` (dataclasses, lists, tuples, dicts) with every string passed through `clean`."""
    import dataclasses

    if isinstance(obj, str):
        return clean(obj, limit)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: clean_strings(getattr(obj, f.name), limit) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list):
        return [clean_strings(v, limit) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clean_strings(v, limit) for v in obj)
    if isinstance(obj, dict):
        return {clean_strings(k, limit): clean_strings(v, limit) for k, v in obj.items()}
    return obj
