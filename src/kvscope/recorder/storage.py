"""Bytes held by tensors, counted by storage spans so that aliased memory counts once.

A tensor's span is the byte range of its storage between its first and last element
(``[offset*es, (offset + sum((size-1)*stride) + 1)*es)``). Spans are keyed by
``(device index, storage data pointer)`` and merged per storage, so K and V that are the same
tensor, views of one fused projection, or a layer shared by two others are counted once.
``torch.equal`` is never used: zero-initialised static K and V compare equal without aliasing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

StorageKey = tuple[int, int]
Span = tuple[StorageKey, int, int]


def dtype_name(dtype: torch.dtype) -> str:
    """Torch's name of a dtype without the ``torch.`` prefix (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def tensor_span(tensor: torch.Tensor) -> Span:
    """The storage key and byte range a tensor's elements lie in (empty range for no elements)."""
    storage_ptr = tensor.untyped_storage().data_ptr()
    key = (tensor.get_device(), storage_ptr)
    start = tensor.data_ptr() - storage_ptr
    if tensor.is_contiguous():  # the hot path: the extent is exactly the tensor's bytes
        return key, start, start + tensor.nbytes
    if tensor.numel() == 0:
        return key, start, start
    last = 0
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        last += (size - 1) * stride
    return key, start, start + (last + 1) * tensor.element_size()


def logical_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's elements would take if it were contiguous."""
    return tensor.numel() * tensor.element_size()


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


def flatten_tensors(value: object, depth: int = 0) -> list[torch.Tensor]:
    """Plain tensors inside a value: a tensor, a tensor subclass that flattens (quanto), or a
    tuple/list/dict of them (HQQ's ``(tensor, meta)``, fp8's ``(tensor, scale)``)."""
    if depth > 3 or value is None:
        return []
    if isinstance(value, torch.Tensor):
        flatten = getattr(type(value), "__tensor_flatten__", None)
        if flatten is not None and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
            inner_names, _ = value.__tensor_flatten__()
            found: list[torch.Tensor] = []
            for name in inner_names:
                found.extend(flatten_tensors(getattr(value, name), depth + 1))
            return found
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten_tensors(item, depth + 1)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flatten_tensors(item, depth + 1)]
    return []
