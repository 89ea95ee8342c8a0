"""Models split over several devices: which device holds each layer's cache, and per-device readings.

With `device_map` (accelerate's `hf_device_map`, pipeline style) each decoder layer, and so its
cache, lives on one device; the device that runs out first is the one holding the most, not the
sum. When the layers span two or more devices the recorder writes `layer_devices` (per
generation) and `device_steps` (per step and device, plus the baseline at step -1 and the reading
after release at step -2). The per-device KV bytes are left to the analyser, which sums the
`layers` rows of each device's layers (the layers' unique bytes, exactly what `steps` sums). One
device, the common case, costs nothing: no probe, no rows.

`DeviceProbe` is the seam: `CudaDevices` reads `torch.cuda.memory_stats(device)` and NVML per
device; tests pass a double (`Recording(..., device_probe=...)`).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch

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
    """Per-device allocator counters (torch.cuda.memory_stats) and NVML memory, read on demand."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self._cuda = [torch.device(d) for d in devices]
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(_physical_index(d.index or 0)) for d in self._cuda]
        except Exception:  # noqa: BLE001 - no NVML: the NVML columns stay null
            self._nvml = None

    def read(self) -> list[DeviceReading]:
        out: list[DeviceReading] = []
        for i, (name, device) in enumerate(zip(self.devices, self._cuda, strict=True)):
            allocated = reserved = split = used = total = None
            if device.type == "cuda":
                stats = torch.cuda.memory_stats(device)
                allocated = stats.get("allocated_bytes.all.current")
                reserved = stats.get("reserved_bytes.all.current")
                split = stats.get("inactive_split_bytes.all.current")
            if self._handles:
                try:
                    info = self._nvml.nvmlDeviceGetMemoryInfo(self._handles[i])
                    used, total = int(info.used), int(info.total)
                except Exception:  # noqa: BLE001 - a failed read is a null, never an error in generate
                    pass
            out.append((name, allocated, reserved, split, used, total))
        return out


def _physical_index(index: int) -> int:
    """NVML numbers devices physically; CUDA_VISIBLE_DEVICES renumbers them for torch."""
    import os

    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


class DeviceRows:
    """The layer_devices and device_steps rows of one recording, buffered per generation."""

    def __init__(self, run_id: str, layers: list[str], probe: DeviceProbe) -> None:
        self.run_id, self.layers, self.probe = run_id, layers, probe
        self.rows: list[tuple[Any, ...]] = []

    def take(self, gen_id: int, step: int) -> None:
        for reading in self.probe.read():
            self.rows.append((self.run_id, gen_id, step, *reading))

    def layer_rows(self, gen_id: int) -> list[tuple[str, int, int, str]]:
        return [(self.run_id, gen_id, layer, device) for layer, device in enumerate(self.layers)]

    def drain(self) -> list[tuple[Any, ...]]:
        rows, self.rows = self.rows, []
        return rows
