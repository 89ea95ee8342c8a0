"""Write traces/lab/labels.csv: for every shipped lab and twin trace and every lab detector, whether
that detector should warn (1) or not (0) — the truth `kvscope tune` and tests/lab/test_shipped_lab.py
score against. It starts from each run's own labels (run.labels, written by `kvscope lab`) and
applies the corrections below, each explained in traces/lab/README.md.

    python scripts/make_lab_labels.py [traces/lab | traces/lab-gpu]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from kvscope.analyzer import load_traces
from kvscope.lab import LAB_DETECTORS

# Runs whose recorded labels are not the whole truth, by run id: the two static scenarios of the
# first H200 recording kept each generation's StaticCache alive through the lab's own kwargs dict
# until the next generation (fixed in kvscope.lab since; the later healthy_static and
# static_compiled runs are the fixed lab's): a real kept cache, so post_eos should flag them.
CORRECTIONS: dict[str, dict[str, object]] = {
    "0983649448b14ebe": {"scenario": "static_kept_by_kwargs", "add": ("post_eos",)},  # recorded as healthy_static
    "5a2e2afb0023408d": {"add": ("post_eos",)},  # preallocated
    # interleaved_growth: its buffer, 1 MiB larger at every step, is memory outside the cache that
    # grows 1 MiB per token, 29-43x this twin's cache rate: growth_curve's linear rule is right to flag it
    "441343dbe877436b": {"add": ("growth_curve",)},
    "bf9abd5eb7294d88": {"add": ("growth_curve",)},  # traces/lab-gpu, gemma-3-4b: 51x its cache's rate
    "b752cb2627684c68": {"add": ("growth_curve",)},  # traces/lab-gpu, deepseek-v2-lite: 34x (glm-4.5-air's: 5.6x)
    "2f0707b1c8584538": {"add": ("growth_curve",)},  # traces/lab-gpu, gemma-4-e4b: 64x
    "ba22fef7b80043dd": {"add": ("growth_curve",)},  # traces/lab-gpu, gemma-4-26b-a4b: 46x (glm-4.7-flash's: 19x)
    "77e60205b2e24c14": {"add": ("growth_curve",)},  # traces/lab-gpu, gemma-4-e2b: 172x
    "66575755624a47d1": {"add": ("growth_curve",)},  # traces/lab-gpu, gpt-oss-120b: 29x
    # gemma-4-31b's interleaved_growth: the prefill of a 1,100-token prompt leaves 310-420 MiB reserved
    # and unused, and the 1 MiB-a-step buffer is placed in it: unused memory ends at most 73 MiB
    # above the healthy run's (11.9% and 15.1% of reserved against 11.4% and 14.0%), nothing stranded
    # to flag, and its 62 MiB is under 20x this 60-layer cache's rate: no fault was planted
    "c01e661020a944f6": {"drop": ("fragmentation",)},
    # kept_scores in gemma-4-e2b: output_scores and output_logits grow 250 KiB a token during each
    # generation, 42x the cache's rate (15 of its 35 layers hold a cache, most of them a full
    # 512-token window): growth_curve is right to say so, as it does for output_attentions
    "ba0674e63b674877": {"add": ("growth_curve",)},
}


def main(argv: list[str] | None = None) -> int:
    root = Path((argv or sys.argv[1:] or ["traces/lab"])[0])
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    if (root / "twins").is_dir():
        paths = [root, root / "twins"]
    elif folders and not any((d / "run").is_dir() for d in folders):  # traces/lab-gpu: a lab per twin
        paths = folders
    else:
        paths = [root]
    with load_traces(paths) as tables:
        runs = tables.rows("SELECT run_id, labels FROM run ORDER BY run_id")
    rows = []
    for run_id, raw in runs:
        labels = json.loads(raw or "{}")
        if "lab" in labels:
            scenario = labels["lab"]
            expected = {d for d in labels.get("expected", "").split(",") if d}
            fix = CORRECTIONS.get(run_id, {})
            scenario = str(fix.get("scenario", scenario))
            expected |= set(fix.get("add", ()))  # type: ignore[arg-type]
            expected -= set(fix.get("drop", ()))  # type: ignore[arg-type]
            kind = "planted" if expected else "control"
        else:
            scenario, expected, kind = f"twin:{labels.get('twin', run_id)}", set(), "twin"
        for det in LAB_DETECTORS:
            rows.append([run_id, "", int(det in expected), det, scenario, kind])
    out = root / "labels.csv"
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["run_id", "gen_id", "expected", "detector", "scenario", "kind"])
        writer.writerows(sorted(rows, key=lambda r: (r[4], r[3])))
    print(f"{out}: {len(rows)} labels for {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
