"""Traces written by today's recorder equal, row by row, those of the recorder before its
simplification (issue 18): goldens recorded with the old code (commit 500f7cb; 0a3e0e5 adds only
this test) per transformers release, over several twins and cache layouts, through both writers.

The golden files hold every row of steps, layers, generations and events (kinds and the detail
keys that do not carry timings) without the clock columns. Regenerate them only for a change of
meaning, never to make this test pass. A golden for a new transformers release (the tests run with
the one constraints/transformers.txt pins) is recorded by the old recorder, in an environment with
that release:
    git worktree add /tmp/old-recorder 0a3e0e5 && pip install -e /tmp/old-recorder
    python /tmp/old-recorder/tests/recorder/test_golden_traces.py   # writes golden/transformers-<version>.json.gz
and copied here.
"""

from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from recorder_helpers import TF_VERSION, TIMING_COLUMNS, prompt_ids, tiny_model  # noqa: E402

import kvscope  # noqa: E402
from kvscope.trace.reader import open_trace  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / f"transformers-{TF_VERSION}.json.gz"
# (name, family, generate keywords): plain dynamic, sliding windows, MLA, a static cache, batch 2.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("gpt_neox", "gpt_neox", {}),
    ("gemma3_text", "gemma3_text", {}),
    ("deepseek_v3", "deepseek_v3", {}),
    ("llama_static", "llama", {"cache_implementation": "static"}),
    ("mistral_batch2", "mistral", {"batch": 2}),
]
SORT_KEYS = {"steps": ["gen_id", "step"], "layers": ["gen_id", "step", "layer"], "generations": ["gen_id"]}


def _record(family: str, generate: dict[str, Any], path: Path, **options: Any) -> None:
    model = tiny_model(family)
    batch = generate.pop("batch", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with kvscope.record(model, path, sample_kv_every=7, **options) as rec:
            for new_tokens in (12, 3):
                ids = prompt_ids(batch)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, **generate)
                del out
                rec.settle()
            rec.mark("end", note=1)


def summary(path: Path) -> dict[str, Any]:
    """Every row that does not depend on clocks, sorted; samples as (step, layer, tensor, shape, dtype, size)."""
    trace = open_trace(path)
    out: dict[str, Any] = {}
    for table, keys in SORT_KEYS.items():
        rows = trace.read(table).sort_by([(k, "ascending") for k in keys]).to_pylist()
        out[table] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]
    out["events"] = sorted((e["kind"], e["gen_id"], e["step"]) for e in trace.read("events").to_pylist())
    samples = trace.read("kv_samples").to_pylist()
    out["kv_samples"] = sorted((s["gen_id"], s["step"], s["layer"], s["tensor"], s["shape"], s["dtype"],
                                len(s["data"])) for s in samples)
    return json.loads(json.dumps(out, default=str))


def _available(family: str) -> bool:
    try:
        tiny_model(family)
    except pytest.skip.Exception:
        return False
    return True


def record_all(workdir: Path, **options: Any) -> dict[str, Any]:
    found = {}
    for name, family, generate in CASES:
        if not _available(family):
            continue
        _record(family, dict(generate), workdir / name, **options)
        found[name] = summary(workdir / name)
    return found


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_traces_equal_the_goldens_of_the_old_recorder(tmp_path: Path, writer: str) -> None:
    if not GOLDEN.exists():
        pytest.fail(f"no golden for transformers {TF_VERSION}: {GOLDEN} (the tests run with the release "
                    "constraints/transformers.txt pins; this file's docstring says how a golden is recorded)")
    golden = json.loads(gzip.decompress(GOLDEN.read_bytes()))
    recorded = record_all(tmp_path, writer=writer, native=False)
    assert sorted(recorded) == sorted(golden)
    for name in golden:
        for table in golden[name]:
            assert recorded[name][table] == golden[name][table], (name, table)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = record_all(Path(tmp), native=False)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(gzip.compress(json.dumps(data, sort_keys=True).encode()))
    print(f"wrote {GOLDEN}: {', '.join(data)}")
