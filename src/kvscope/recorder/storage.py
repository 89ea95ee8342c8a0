"""Bytes held by tensors, counted by storage spans so that aliased memory counts once.

A tensor's span is the byte range of its storage between its first and last element
(``[offset*es, (offset + sum((size-1)*stride) + 1)*es)``). Spans are keyed by
``(device index, storage data pointer)`` and merged per storage, so K and V that are the same
tensor, views of one fused projection, or a layer shared by two others are counted once.
``torch.equal`` is never used: zero-initialised static K and V compare equal without aliasing.
"""

from __future__ import annotations

import torch

from kvscope.recorder.spans import Span, StorageKey, covered_bytes, spans_overlap, union_bytes

__all__ = ["Span", "StorageKey", "covered_bytes", "dtype_name", "flatten_tensors", "spans_overlap",
           "tensor_span", "union_bytes"]


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
