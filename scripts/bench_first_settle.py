"""How long a process's first `settle()` waits for a fresh writer process (issue 18).

    PYTHONPATH=src python3 scripts/bench_first_settle.py --rounds 3 [--device cuda]

Each round starts a fresh Python process that loads a tiny model (or the pythia-1.4b twin with
`--device cuda`), opens a record block with the default writer process, generates 3 tokens and
times `settle()` (which waits until the rows are on disk, so until the writer process is started and
has written them) and `__exit__`. `--torch-version-object` sends the run row's torch version as the
TorchVersion object it was before 0fe2a88 (unpickling it made the writer process import torch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import torch
import kvscope
from kvscope.recorder import run_info
from kvscope.twins.build import build_twin
from kvscope.twins.spec import load_twin, shrink_config
device, old = sys.argv[1], sys.argv[2] == "1"
if old:  # the run row as it was: torch.__version__ itself
    original = run_info.run_metadata
    def run_metadata(*a, **k):
        meta = original(*a, **k)
        object.__setattr__(meta, "torch_version", torch.__version__)
        return meta
    run_info.run_metadata = run_metadata
    import kvscope.recorder.session as session
    session.run_metadata = run_metadata
spec = load_twin("pythia-1.4b")
model = build_twin(spec if device == "cuda" else shrink_config(spec), dtype="bfloat16" if device == "cuda" else "float32", device=device)
ids = torch.randint(3, 500, (1, 16)).to(device)
rec = kvscope.record(model, Path(tempfile.mkdtemp()) / "t")
t0 = time.perf_counter(); rec.__enter__(); t1 = time.perf_counter()
out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False); del out
t2 = time.perf_counter(); rec.settle(); t3 = time.perf_counter(); rec.__exit__(None, None, None); t4 = time.perf_counter()
print(json.dumps({"enter_s": t1 - t0, "generate_s": t2 - t1, "settle_s": t3 - t2, "exit_s": t4 - t3}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"str": [], "TorchVersion": []}
    for _ in range(args.rounds):
        for variant, flag in (("str", "0"), ("TorchVersion", "1")):
            done = subprocess.run([sys.executable, "-c", CHILD, args.device, flag], capture_output=True,
                                  text=True, check=True)
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(variant, results[variant][-1], flush=True)
    summary = {v: {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]} for v, rows in results.items()}
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "rounds": results, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
