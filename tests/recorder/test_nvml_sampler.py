"""The NVML sampler takes readings off the hook's thread and hands every step its value."""

from __future__ import annotations

import threading

from kvscope.recorder.telemetry import NvmlSampler


class _CountingProbe:
    """Stands in for NVML (none on CI): each read returns the next value of a counter."""

    enabled = True

    def __init__(self) -> None:
        self.reads = 0
        self.lock = threading.Lock()

    def used(self) -> int:
        with self.lock:
            self.reads += 1
            return 1_000 + self.reads


def test_every_requested_step_gets_a_reading_and_the_peak_is_the_max() -> None:
    probe = _CountingProbe()
    sampler = NvmlSampler(probe)  # type: ignore[arg-type]
    for step in range(200):
        sampler.request(3, step)
    values = sampler.take([(3, step) for step in range(200)])
    assert None not in values
    assert values == sorted(values)  # later steps never get an older reading
    assert 1 <= probe.reads <= 200  # requests that pile up share one read
    assert sampler.peak(3) == values[-1] == 1_000 + probe.reads
    assert sampler.peak(4) is None
    assert sampler.take([(3, 0)]) == [None]  # taken values are handed out once
    sampler.close()
