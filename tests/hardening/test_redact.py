"""`kvscope redact`: host, local paths, chosen labels, prompt ids and prompt text gone; analysis unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvscope.trace.reader import open_trace
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

Cli = Callable[..., tuple[int, str, str]]


def _private_trace(path: Path) -> Path:
    trace = build_synthetic_trace(path, SynthSpec(num_layers=2, generations=2, steps=16,
                                                  model_name="/home/alice/models/llama-secret",
                                                  labels={"team": "ml-infra", "ticket": "SEC-42", "owner": "alice"}))
    run = next((trace / "run").glob("part-*.parquet"))
    data = pq.read_table(run)
    meta = data.schema.metadata
    i = data.schema.get_field_index("options")
    data = data.set_column(i, data.schema.field(i), pa.array([json.dumps(
        {"prompts": "/home/alice/private/prompts.jsonl", "out": "/srv/alice/traces/run1", "flush_every": 64})]))
    pq.write_table(data.replace_schema_metadata(meta), run)
    gens = next((trace / "generations").glob("part-*.parquet"))
    data = pq.read_table(gens)
    meta = data.schema.metadata
    data = data.set_column(data.schema.get_field_index("prompt_id"), pa.field("prompt_id", pa.string()),
                           pa.array(["alice-secret-prompt-a", "alice-secret-prompt-b"]))
    data = data.set_column(data.schema.get_field_index("prompt_text"), pa.field("prompt_text", pa.string()),
                           pa.array(["my secret prompt", "another"]))
    pq.write_table(data.replace_schema_metadata(meta), gens)
    return trace


def test_redact(tmp_path: Path, cli: Cli) -> None:
    trace = _private_trace(tmp_path / "private")
    out = tmp_path / "shared"
    code, _, err = cli("redact", trace, "-o", out, "--label", "owner", "--label", "ticket")
    assert code == 0, err
    def text_of(root: Path) -> str:  # every decoded value and key-value metadata, as text
        parts = [pq.read_table(p) for p in root.rglob("*.parquet")]
        return "".join(str(t.to_pylist()) + str(t.schema.metadata) for t in parts)

    raw, original = text_of(out), text_of(trace)
    shared = open_trace(out)
    run = shared.read("run").to_pylist()[0]
    assert run["host"] == "redacted" and run["model_name"] == "<path>/llama-secret"
    assert json.loads(run["labels"]) == {"team": "ml-infra"}
    options = json.loads(pq.read_table(next((out / "run").glob("*.parquet")))["options"][0].as_py())
    assert options == {"prompts": "<path>/prompts.jsonl", "out": "<path>/run1", "flush_every": 64}
    gens = pq.read_table(next((out / "generations").glob("*.parquet")))
    ids = gens["prompt_id"].to_pylist()
    assert all(i.startswith("prompt-") for i in ids) and len(set(ids)) == 2
    assert gens["prompt_text"].null_count == 2
    for secret in ("alice", "SEC-42", "secret prompt", "/home", "/srv"):
        assert secret not in raw, secret
        assert secret in original  # the original is untouched
    code, a, _ = cli("analyze", trace, "--format", "json")
    code2, b, _ = cli("analyze", out, "--format", "json")
    assert code == code2 == 0
    strip = [{k: v for k, v in f.items() if k not in ("message", "evidence")} for f in json.loads(a)]
    assert strip == [{k: v for k, v in f.items() if k not in ("message", "evidence")} for f in json.loads(b)]
    assert cli("inspect", out)[0] == 0


def test_redact_refuses_bad_output(tmp_path: Path, trace: Path, cli: Cli) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    for target in (tmp_path / "busy", trace / "inside"):
        code, _, err = cli("redact", trace, "-o", target)
        assert code == 2 and err.startswith("kvscope: error: "), err
