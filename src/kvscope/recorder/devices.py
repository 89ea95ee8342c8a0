"""Models split over several devices: which device holds each layer's cache, and per-device readings.

With `device_map` (accelerate's `hf_device_map`, pipeline style) each decoder layer, and so its
cache, lives on one device; the device that runs out first is the one holding the most, not the
sum. When the layers span two or more devices the recorder writes `layer_devices` (per
generation) and `device_steps` (per step and device, plus the baseline at step -1 and the reading
after release at step -2). The per-device KV bytes are left to the analyser, which sums the
`layers` rows of each device's layers (the layers' unique bytes, exactly what `steps` sums). One
device, the common case, costs nothing: no probe, no rows.

`DeviceProbe` is the seam: `CudaDevices` takes each device's allocator values from the session's
`AllocatorProbe` (read just before, every step) and NVML from its `NvmlProbe`; tests pass a double
(`Recording(..., device_probe=...)`).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch

from kvscope.recorder.allocator import AllocatorProbe
from kvscope.recorder.nvml import NvmlProbe

# device, allocated, reserved, inactive_split, nvml_used, nvml_total (bytes; None where unread)
DeviceReading = tuple[str, int | None, int | None, int | None, int | None, int | None]
DEVICE_STEP_COLUMNS = ("run_id", "gen_id", "step", "device", "allocated_bytes", "reserved_bytes",
                       "inactive_split_bytes", "nvml_used_bytes", "nvml_total_bytes")
BASELINE_STEP, RELEASED_STEP = -1, -2
# decoder layers in hf_device_map keys: model.layers.3, transformer.h.3, gpt_neox.layers.3, ...
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|decoder\.layers)\.(\d+)$")


class DeviceProbe(Protocol):
    devices: tuple[str, ...]

    def read(self) -> list[DeviceReading]: ...


def _device_name(value: Any) -> str:
    if isinstance(value, int):
        return f"cuda:{value}"
    if isinstance(value, torch.device):
        return str(value) if value.index is not None or value.type != "cuda" else "cuda:0"
    return str(value)


def layer_devices(model: torch.nn.Module, num_layers: int) -> list[str] | None:
    """The device of each decoder layer (its cache's device), when they span two or more devices.

    Read from accelerate's `hf_device_map`: a layer not named in it inherits the device of the
    deepest module above it that is (a map of "model": 0 puts every layer on cuda:0)."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not device_map or num_layers <= 0:
        return None
    found: dict[int, str] = {}
    for key, value in device_map.items():
        match = _LAYER_KEY.search(str(key))
        if match and int(match.group(1)) < num_layers:
            found[int(match.group(1))] = _device_name(value)
    if len(found) != num_layers:
        return None
    devices = [found[i] for i in range(num_layers)]
    return devices if len(set(devices)) > 1 else None


class CudaDevices:
    """Per-device allocator counters and NVML memory of a split model, from the session's probes.

    The allocator values are those of the `AllocatorProbe.read()` taken just before (it reads each
    device anyway, then sums): no second stats call. NVML is one read per device."""

    def __init__(self, devices: tuple[str, ...], allocator: AllocatorProbe, nvml: NvmlProbe) -> None:
        self.devices = devices
        self._indices = [torch.device(d).index or 0 for d in devices]
        self._allocator, self._nvml = allocator, nvml

    def read(self) -> list[DeviceReading]:
        out: list[DeviceReading] = []
        for name, index in zip(self.devices, self._indices, strict=True):
            values = self._allocator.last_by_device.get(index)
            try:
                used, total = self._nvml.memory_of(index)
            except Exception:  # noqa: BLE001 - a failed read is a null, never an error in generate
                used = total = None
            out.append((name, *(values[:2] if values else (None, None)), values[3] if values else None, used, total))
        return out


class DeviceRows:
    """The layer_devices and device_steps rows of one recording, buffered per generation."""

    def __init__(self, run_id: str, layers: list[str], probe: DeviceProbe) -> None:
        self.run_id, self.layers, self.probe = run_id, layers, probe
        self.rows: list[tuple[Any, ...]] = []

    def take(self, gen_id: int, step: int) -> None:
        """Buffer every device's reading (callers read the AllocatorProbe first: CudaDevices reuses it)."""
        for reading in self.probe.read():
            self.rows.append((self.run_id, gen_id, step, *reading))

    def layer_rows(self, gen_id: int) -> list[tuple[str, int, int, str]]:
        return [(self.run_id, gen_id, layer, device) for layer, device in enumerate(self.layers)]

    def drain(self) -> list[tuple[Any, ...]]:
        rows, self.rows = self.rows, []
        return rows
