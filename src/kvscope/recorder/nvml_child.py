"""The NVML polling process (run as a script by `nvml_poller.NvmlPoller`; stdlib and pynvml only).

    python nvml_child.py RING_PATH INTERVAL_US (UUID | INDEX | fake)...

Writes `(time, used bytes summed over the devices)` pairs into a ring of int64 in the memory-mapped
file RING_PATH: slot 0 counts the readings written so far, then pairs follow. Time is
`time.perf_counter_ns()` taken just before the NVML call (CLOCK_MONOTONIC, shared by every process
on Linux). Prints "ready" once NVML answered, or "error: ..." and exits 1. Stops when its stdin
closes or receives a line, or when its parent process is gone. The device "fake" reads a counter
instead of NVML (for tests on machines without a GPU).
"""

from __future__ import annotations

import mmap
import os
import select
import sys
import time


def main(argv: list[str]) -> int:
    ring_path, interval_us, devices = argv[0], int(argv[1]), argv[2:]
    parent = os.getppid()
    try:
        if devices == ["fake"]:
            counter = [0]

            def used() -> int:
                counter[0] += 1
                return 1_000_000 + counter[0]
        else:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByUUID(d) if d.startswith("GPU-")
                       else pynvml.nvmlDeviceGetHandleByIndex(int(d)) for d in devices]
            get = pynvml.nvmlDeviceGetMemoryInfo

            def used() -> int:
                return sum(get(h).used for h in handles)
        used()
        with open(ring_path, "r+b") as handle:
            ring_map = mmap.mmap(handle.fileno(), 0)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        return 1
    ring = memoryview(ring_map).cast("q")
    slots = (len(ring) - 1) // 2
    count = 0
    print("ready", flush=True)
    interval = interval_us / 1e6
    stdin = sys.stdin.fileno()
    while True:
        start = time.perf_counter_ns()
        value = used()
        slot = 1 + 2 * (count % slots)
        ring[slot] = start
        ring[slot + 1] = value
        count += 1
        ring[0] = count  # published after its slot is complete
        wait = interval - (time.perf_counter_ns() - start) / 1e9
        readable, _, _ = select.select([stdin], [], [], max(wait, 0.0))
        if readable or os.getppid() != parent:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
