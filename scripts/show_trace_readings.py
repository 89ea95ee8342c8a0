"""Print, per trace, how many allocator/NVML readings are null and their range (pyarrow only).

    PYTHONPATH=src python3 scripts/show_trace_readings.py TRACE...
"""

from __future__ import annotations

import sys

from kvscope.trace.reader import open_trace

STEP_READINGS = ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes", "alloc_retries",
                 "num_ooms", "nvml_used_bytes", "nvml_total_bytes")
POINTS = ("baseline", "peak", "post_return", "post_release", "post_empty_cache")


def main(paths: list[str]) -> int:
    for path in paths:
        trace = open_trace(path)
        steps = trace.read("steps", list(STEP_READINGS)).to_pydict()
        for name in STEP_READINGS:
            values = steps[name]
            present = [v for v in values if v is not None]
            span = f"min {min(present):,} max {max(present):,}" if present else "all null"
            print(f"{path} steps.{name}: {len(values) - len(present)} null of {len(values)}, {span}")
        for row in trace.read("generations").sort_by("gen_id").to_pylist():
            readings = ", ".join(f"{p} {row[f'{p}_allocated_bytes']}/{row[f'{p}_reserved_bytes']}/"
                                 f"{row[f'{p}_nvml_used_bytes']}" for p in POINTS)
            print(f"{path} generation {row['gen_id']} (allocated/reserved/nvml bytes): {readings}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
