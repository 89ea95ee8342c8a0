"""`make demo`: record a small random-weight twin on the CPU, inspect the trace, then analyse it.

The twin is gpt-oss-20b's structure shrunk (`--shrink`): the same 24 layers, 8 KV heads of 64 and
alternating 128-token sliding windows, with a small MLP, 4 experts and a 512-token vocabulary, so
it runs on two CPU cores in well under a minute. The last prompts cross the window: the sliding
layers stop growing while the full layers keep going.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvscope.cli.main import main as kvscope


def run(out: Path) -> int:
    if out.exists():
        shutil.rmtree(out)
    code = kvscope(["record", "--twin", "gpt-oss-20b", "--shrink", "--dtype", "float32", "--device", "cpu",
                    "--limit", "4", "--max-new-tokens", "32", "--label", "demo=1", "-o", str(out)])
    if code:
        return code
    code = kvscope(["inspect", str(out)])
    if code:
        return code
    print("\nanalysis (no GPU here: the memory detectors have no allocator readings to judge):")
    return kvscope(["analyze", str(out), "--min-severity", "info"])


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-trace")))
