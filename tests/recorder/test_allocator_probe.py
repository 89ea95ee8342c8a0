"""The allocator reading is parsed from the nested dict of `torch._C._cuda_memoryStats`.

On CPU there is no allocator, so the stats call is replaced by one returning a dict of the shape torch
documents for `torch.cuda.memory_stats_as_nested_dict` (the GPU tests read the real one).
"""

from __future__ import annotations

from typing import Any

from recorder_helpers import prompt_ids, tiny_model

import kvscope
from kvscope.recorder.allocator import AllocatorProbe, AllocatorReading
from kvscope.trace.reader import open_trace


def _stat(current: int, peak: int) -> dict[str, int]:
    return {"current": current, "peak": peak, "allocated": peak, "freed": peak - current}


def _nested(base: int) -> dict[str, Any]:
    def pools(current: int, peak: int) -> dict[str, dict[str, int]]:
        return {"all": _stat(current, peak), "small_pool": _stat(0, 0), "large_pool": _stat(current, peak)}

    return {"allocated_bytes": pools(base + 1, base + 10), "reserved_bytes": pools(base + 2, base + 20),
            "active_bytes": pools(base + 3, base + 30), "inactive_split_bytes": pools(base + 4, base + 40),
            "num_alloc_retries": base + 5, "num_ooms": base + 6}


def _probe(devices: tuple[int, ...]) -> AllocatorProbe:
    probe = AllocatorProbe(())
    probe.devices = devices
    probe._read = lambda device: _nested(1000 * (device + 1))
    return probe


def test_one_device_reading() -> None:
    reading = _probe((0,)).read()
    assert isinstance(reading, AllocatorReading)
    assert reading == AllocatorReading(1001, 1002, 1003, 1004, 1005, 1006, 1010, 1020)
    assert reading.inactive_split == 1004 and reading.peak_reserved == 1020


def test_readings_of_several_devices_are_summed() -> None:
    reading = _probe((0, 1)).read()
    assert reading == AllocatorReading(3002, 3004, 3006, 3008, 3010, 3012, 3020, 3040)


def test_no_cuda_device_reads_none() -> None:
    probe = AllocatorProbe(())
    assert not probe.enabled and probe.read() is None


def test_a_reading_lands_in_its_step_columns(tmp_path: Any) -> None:
    model = tiny_model("gpt_neox")
    readings = iter(range(100))
    with kvscope.record(model, tmp_path / "t", native=False) as rec:
        def read() -> AllocatorReading:
            base = 10 * next(readings)
            return AllocatorReading(*(base + k for k in range(1, 9)))

        rec.steps.allocator.read = read
        out = model.generate(prompt_ids(), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        del out
    steps = open_trace(tmp_path / "t").read("steps").sort_by("step").to_pydict()
    columns = ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes", "alloc_retries",
               "num_ooms")
    rows = [[steps[c][i] for c in columns] for i in range(3)]
    bases = [row[0] - 1 for row in rows]  # one reading per step, each the next from the probe
    assert bases == sorted(set(bases)) and all(b % 10 == 0 for b in bases)
    assert rows == [[base + k for k in range(1, 7)] for base in bases]
