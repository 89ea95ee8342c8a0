"""Every measure query (and the verdict's and fleet's) runs on DuckDB and on Spark, with the same rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spark_helpers import rounded

from kvscope.analyzer.fleet import run_meta
from kvscope.analyzer.load import load_traces
from kvscope.analyzer.registry import registry
from kvscope.analyzer.run_facts import run_facts
from kvscope.analyzer.spark import load_spark, to_spark
from kvscope.schema.tables import TABLES
from kvscope.trace.synth import SynthSpec, build_synthetic_trace


def _part(trace: Path, table: str, columns: dict[str, list[Any]]) -> None:
    spec = TABLES[table]
    data = pa.table({n: pa.array(v, type=spec.column(n).type) for n, v in columns.items()})
    (trace / table).mkdir(exist_ok=True)
    pq.write_table(data.replace_schema_metadata({b"kvscope.format": b"1.0", b"kvscope.table": table.encode()}),
                   trace / table / "part-900000000000.parquet")


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Traces that make every measure query return rows: every plant, an MLA model with head stats,
    an OOM event and an error event."""
    root = tmp_path_factory.mktemp("measure")
    everything = build_synthetic_trace(root / "all", SynthSpec(
        run_id="all", num_layers=4, layer_types=("sliding_attention", "full_attention") * 2, sliding_window=32,
        prompt_tokens=8, generations=2, retention=0.3, fragmentation=True, superlinear=True, odd_layer=1,
        undeclared_sliding=True, preallocated=True, labels={"variant": "x"}))
    mla = build_synthetic_trace(root / "mla", SynthSpec(
        run_id="mla", num_layers=3, layer_types=("latent",) * 3, kv_lora_rank=512, qk_rope_head_dim=64,
        num_attention_heads=16, generations=2, outside_growth=True))
    for part in (mla / "run").glob("part-*.parquet"):  # the DeepSeek keys mla_latent needs
        run = pq.read_table(part)
        config = {**json.loads(run.column("model_config")[0].as_py()), "qk_nope_head_dim": 128, "v_head_dim": 128}
        run = run.set_column(run.schema.get_field_index("model_config"), "model_config",
                             pa.array([json.dumps(config)], pa.string()))
        pq.write_table(run.replace_schema_metadata(pq.read_schema(part).metadata), part)
    stats = [("key_norm_max", 2.0), ("value_norm_max", 3.0), ("key_norm_mean", 1.0), ("value_norm_mean", 1.5),
             ("low_mass_fraction", 0.4), ("latent_effective_rank", 100.0), ("latent_width", 512.0)]
    rows = [(layer, head, stat, value * (1e-9 if head == 1 and "norm" in stat else 1.0))
            for layer in range(3) for head in range(4) for stat, value in stats]
    _part(mla, "head_stats", {
        "run_id": ["mla"] * len(rows), "gen_id": [0] * len(rows), "step": [5] * len(rows),
        "layer": [r[0] for r in rows], "head": [r[1] for r in rows], "stat": [r[2] for r in rows],
        "value": [r[3] for r in rows], "tokens": [64] * len(rows), "source": ["offline"] * len(rows)})
    _part(everything, "events", {
        "run_id": ["all", "all"], "gen_id": [1, 1], "step": [3, 4], "t_ns": [10**9, 2 * 10**9],
        "kind": ["error", "oom"],
        "detail": [json.dumps({"source": "cache_walk", "failed_steps": 1, "first_step": 3, "last_step": 3,
                               "exception": "RuntimeError", "message": "x"}),
                   json.dumps({"message": "CUDA out of memory. Tried to allocate 2.00 GiB",
                               "last_step": {"step": 3, "seq_len": 40, "kv_bytes": 1 << 20,
                                             "allocator": {"allocated": 3 << 30, "reserved": 4 << 30}}})]})
    # a model split over two devices (device_steps) and the two ranks of a tensor-parallel job
    split = build_synthetic_trace(root / "split", SynthSpec(
        run_id="split", num_layers=4, devices=("cuda:0", "cuda:1"), layers_per_device=(1, 3), retention=0.5))
    ranks = [build_synthetic_trace(root / "job" / f"rank-{r}", SynthSpec(
        run_id=f"rank{r}", job_id="job", rank=r, world_size=2, device=f"cuda:{r}")) for r in (0, 1)]
    return [everything, mla, split, *ranks]


def _measure_all(engine: Any) -> dict[str, Any]:
    out = {name: rounded(det.measured(engine)) for name, det in sorted(registry().items()) if det.split}
    out["run_facts"] = rounded(run_facts(engine))
    out["run_meta"] = rounded(run_meta(engine, ("host", "model", "transformers", "variant")))
    return out


def test_every_measure_query_runs_on_both_engines_with_the_same_rows(traces: list[Path], spark: Any) -> None:
    with load_traces(traces) as duck:
        on_duckdb = _measure_all(duck)
        duck_queries = list(duck.queries)
    with load_spark([str(t) for t in traces]) as sp:
        on_spark = _measure_all(sp)
        spark_queries = list(sp.queries)
    assert duck_queries == spark_queries and len(duck_queries) >= 30
    for query in duck_queries:
        assert to_spark(query)  # each one translated (and, above, run by Spark)
    for name, measured in on_duckdb.items():
        assert on_spark[name] == measured, name
    # the traces exercise every detector: each measured something
    assert all(any(v for v in m.values()) if isinstance(m, dict) else m for m in on_duckdb.values())
    assert on_duckdb["dead_heads"]["heads"] and on_duckdb["mla_latent"]["ranks"] and on_duckdb["mla_latent"]["layers"]
    assert on_duckdb["oom_event"]["ooms"] and on_duckdb["cache_seen"]["events"]
    assert {(d["run_id"], d["device"]) for d in on_duckdb["device_memory"]["devices"]} == {
        ("split", "cuda:0"), ("split", "cuda:1"), ("rank0", "cuda:0"), ("rank1", "cuda:1")}
