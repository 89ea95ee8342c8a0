"""Allocator readings: PyTorch's caching allocator, one stats call per step (NVML: `nvml.py`).

Costs on the H100 host: ``torch.cuda.memory_stats()`` ~79 µs (it flattens a nested dict in
Python; the nested dict it starts from is what we read), ``nvmlDeviceGetMemoryInfo`` ~9 µs, while
``memory_allocated()`` + ``memory_reserved()`` cost 225 µs together: never use the convenience
getters per step. Without CUDA or NVML every reading is None (null in the trace), never 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class AllocatorReading(NamedTuple):  # a tuple: built every step; fields 0-5 are columns.ALLOCATOR_COLUMNS
    allocated: int
    reserved: int
    active: int
    inactive_split: int
    alloc_retries: int
    num_ooms: int
    peak_allocated: int
    peak_reserved: int


_new_reading = tuple.__new__  # builds the named tuple in C (its generated __new__ is Python code)


def _nested_stats_reader() -> Any:
    # The C entry point returns the nested dict that memory_stats() would flatten afterwards.
    raw = getattr(torch._C, "_cuda_memoryStats", None)
    if raw is not None:
        return raw
    return lambda device: torch.cuda.memory.memory_stats_as_nested_dict(device)


class AllocatorProbe:
    """Reads the caching allocator of the model's CUDA device(s), one stats call per device."""

    def __init__(self, devices: tuple[int, ...], native: Any = None) -> None:
        self.devices = devices if torch.cuda.is_available() else ()
        self._read = _nested_stats_reader() if self.devices else None
        # The C++ fast path's reader (8 ints straight from the allocator), where this torch has
        # the device-allocator API; it answers None where it cannot read, and the stats call does.
        self._native_read = native.allocator_stats if native is not None and self.devices else None
        # several devices: each one's values of the last read (per-device rows reuse them, no second call)
        self.last_by_device: dict[int, tuple[int, ...]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.devices)

    def read(self) -> AllocatorReading | None:
        if not self.devices:
            return None
        if len(self.devices) == 1:  # the usual case, every step: no summing
            return _new_reading(AllocatorReading, self._device_values(self.devices[0]))
        per_device = [self._device_values(device) for device in self.devices]
        self.last_by_device = dict(zip(self.devices, per_device, strict=True))
        return _new_reading(AllocatorReading, tuple(map(sum, zip(*per_device, strict=True))))

    def _device_values(self, device: int) -> tuple[int, ...]:
        """One device's reading, in `AllocatorReading` order, from one nested stats call."""
        if self._native_read is not None:
            values = self._native_read(device)
            if values is not None:
                return values
        stats = self._read(device)
        allocated = stats["allocated_bytes"]["all"]
        reserved = stats["reserved_bytes"]["all"]
        return (allocated["current"], reserved["current"], stats["active_bytes"]["all"]["current"],
                stats["inactive_split_bytes"]["all"]["current"], stats["num_alloc_retries"], stats["num_ooms"],
                allocated["peak"], reserved["peak"])

    def reset_peaks(self) -> None:
        for device in self.devices:
            torch.cuda.reset_peak_memory_stats(device)

    def snapshot(self) -> dict[str, Any]:
        """The full flattened stats of each device, for an OOM event (cost does not matter there)."""
        return {str(d): {k: v for k, v in torch.cuda.memory_stats(d).items() if ".all." in k or "num_" in k}
                for d in self.devices}

    def empty_cache(self) -> None:
        if self.devices:
            torch.cuda.empty_cache()


def memory_limit(devices: tuple[int, ...], nvml_total: int | None) -> tuple[int | None, dict[str, Any] | None]:
    """The device memory this process may use when something caps it below the device's total.

    Read once, when a recording starts: `torch.cuda.set_per_process_memory_fraction` (the caching
    allocator refuses to reserve past fraction × the device's memory), a MIG slice (torch sees less
    memory than NVML reports for the handle) and an MPS limit (`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`).
    Returns (bytes summed over the devices, how it was found) or (None, None) when nothing caps it.
    """
    if not devices or not torch.cuda.is_available():
        return None, None
    import os

    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    total_limit, sources = 0, []
    for device in devices:
        device_total = int(torch.cuda.get_device_properties(device).total_memory)
        limit = device_total
        fraction = float(get_fraction(device)) if get_fraction is not None else 1.0
        if fraction < 1.0:
            limit = int(fraction * device_total)
            sources.append({"device": device, "kind": "per_process_memory_fraction", "fraction": fraction,
                            "device_bytes": device_total})
        total_limit += limit
    if nvml_total is not None and total_limit < 0.9 * nvml_total and not sources:
        # torch sees far less memory than NVML's handle (they differ by ~1% on a whole GPU): a MIG slice
        sources.append({"kind": "mig_or_visible_memory", "torch_total_bytes": total_limit, "nvml_total_bytes": nvml_total})
    mps = os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")
    if mps:
        sources.append({"kind": "mps_pinned_device_mem_limit", "value": mps})
        total_limit = min(total_limit, _mps_limit_bytes(mps, devices) or total_limit)
    if not sources:
        return None, None
    return total_limit, {"bytes": total_limit, "sources": sources}


def _mps_limit_bytes(value: str, devices: tuple[int, ...]) -> int | None:
    """`0=2G,1=4096M` or `2G` (applies to every device) in bytes, summed over `devices`."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    per_device: dict[int | None, int] = {}
    for item in value.split(","):
        key, _, amount = item.strip().rpartition("=")
        amount = amount.strip().upper().removesuffix("B")
        unit = amount[-1:] if amount[-1:] in units and not amount[-1:].isdigit() else ""
        number = amount[: len(amount) - len(unit)]
        try:
            per_device[int(key) if key else None] = int(float(number) * units[unit])
        except ValueError:
            return None
    found = [per_device.get(d, per_device.get(None)) for d in devices]
    return sum(found) if all(v is not None for v in found) else None  # type: ignore[misc]
