"""Byte ranges and their unions: the arithmetic of unique bytes, without torch (the writer
process imports it)."""

from __future__ import annotations

from collections.abc import Iterable

StorageKey = tuple[int, int]
Span = tuple[StorageKey, int, int]


def covered_bytes(ranges: Iterable[tuple[int, int]]) -> int:
    """Bytes covered by `[start, end)` ranges of one address space, overlaps counted once."""
    total = 0
    cur_start = cur_end = None
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def union_bytes(spans: Iterable[Span]) -> int:
    """Total bytes covered by the spans, overlapping ranges of one storage counted once."""
    per_storage: dict[StorageKey, list[tuple[int, int]]] = {}
    for key, start, end in spans:
        per_storage.setdefault(key, []).append((start, end))
    return sum(covered_bytes(ranges) for ranges in per_storage.values())


def spans_overlap(a: list[Span], b: list[Span]) -> bool:
    """Whether any span of `a` shares bytes with any span of `b` (same storage, overlapping range)."""
    for key_a, start_a, end_a in a:
        for key_b, start_b, end_b in b:
            if key_a == key_b and start_a < end_b and start_b < end_a:
                return True
    return False
