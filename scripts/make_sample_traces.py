"""Regenerate the sample traces in traces/ with `kvscope record` (on a GPU host for real readings).

    PYTHONPATH=src python3 scripts/make_sample_traces.py [OUTDIR]   # default: traces/

pythia-1.4b twin (full size, bf16) and gpt-oss-20b twin (--shrink, bf16), first 4 built-in prompts,
128 new tokens each, then `kvscope inspect` on each. On CPU the GPU readings are null.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvscope.cli.main import main as kvscope

SAMPLES = (
    ("pythia-1.4b", ["--twin", "pythia-1.4b", "--dtype", "bfloat16"]),
    ("gpt-oss-20b-shrunk", ["--twin", "gpt-oss-20b", "--shrink", "--dtype", "bfloat16"]),
)


def main(out: Path) -> int:
    status = 0
    for name, options in SAMPLES:
        trace = out / name
        if trace.exists():
            shutil.rmtree(trace)
        code = kvscope(["record", *options, "--limit", "4", "--max-new-tokens", "128", "--label", "sample=1",
                        "-o", str(trace)])
        status = status or code or kvscope(["inspect", str(trace)])
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "traces")))
