"""`kvscope analyze` over the fault lab recorded on the H200 in ten more twins (traces/lab-gpu):
pythia-1.4b (GPT-NeoX: fused query_key_value, no sliding layers) with 48/80/112-token prompts,
gemma-3-4b (29 sliding layers of a 1,024-token window, 5 full) after 1,000/1,100-token prompts, where
kept copies grow linearly rather than quadratically, gemma-4-e4b (KV-shared layers that cache
nothing, 512-token windows) after 600/700-token prompts, gemma-4-26b-a4b (MoE, 1,024-token windows)
after 1,100/1,200-token prompts, and three MoE twins with 48/112-token prompts: deepseek-v2-lite and
glm-4.7-flash (MLA latents cached) and glm-4.5-air (46 full layers); gemma-4-e2b (20 of 35 layers
KV-shared) after 600/700-token prompts, gemma-4-31b (60 layers) after 1,100/1,200 and gpt-oss-120b
(128-token windows) after 200/300. Every planted condition is
flagged by the detector its label names and its headline says what it is; no control is flagged.
Labels: traces/lab-gpu/labels.csv (scripts/make_lab_labels.py traces/lab-gpu)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import pytest
from lab_headlines import HEADLINES

import kvscope

LAB = Path(__file__).resolve().parents[2] / "traces" / "lab-gpu"
pytestmark = pytest.mark.skipif(not (LAB / "labels.csv").is_file(), reason="no shipped GPU lab traces")



def _labels() -> dict[str, dict]:
    runs: dict[str, dict] = defaultdict(lambda: {"expected": set()})
    with (LAB / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            runs[row["run_id"]].update(scenario=row["scenario"], kind=row["kind"])
            if row["expected"] == "1":
                runs[row["run_id"]]["expected"].add(row["detector"])
    return dict(runs)


def test_every_planted_condition_is_flagged_and_named_and_no_control_is() -> None:
    labels = _labels()
    twins = sorted(d for d in LAB.iterdir() if d.is_dir())
    result = kvscope.analyze(twins)
    flagged: dict[str, set[str]] = defaultdict(set)
    for f in result.findings:
        if f.severity in ("warning", "critical"):
            flagged[f.run_id].add(f.detector)
    headlines = {r.run_id: r.headline for r in result.verdict.runs}
    assert set(headlines) == set(labels)
    assert sorted(r["kind"] for r in labels.values()).count("planted") == 102
    for run_id, run in labels.items():
        if run["kind"] == "planted":
            assert run["expected"] <= flagged[run_id], (run["scenario"], flagged[run_id])
            assert HEADLINES[run["scenario"]] in headlines[run_id], (run["scenario"], headlines[run_id])
        else:
            assert not flagged[run_id] and headlines[run_id] == "healthy", (run["scenario"], flagged[run_id])
