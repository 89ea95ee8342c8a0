"""`make demo`: build a synthetic trace and inspect it (the recorder replaces this with a recording)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvscope.cli.main import main as kvscope
from kvscope.trace.synth import SynthSpec, build_synthetic_trace


def run(out: Path) -> int:
    if out.exists():
        shutil.rmtree(out)
    spec = SynthSpec(
        num_layers=36,
        layer_types=tuple(["sliding_attention", "full_attention"] * 18),
        sliding_window=128,
        num_kv_heads=8,
        head_dim=64,
        steps=512,
        model_name="gpt-oss-120b geometry (synthetic)",
        model_type="gpt_oss",
    )
    build_synthetic_trace(out, spec)
    print(f"wrote a synthetic gpt-oss-120b-geometry trace to {out}")
    return kvscope(["inspect", str(out)])


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-trace")))
