"""A model split over two devices (accelerate's hf_device_map) records per-device rows.

The CPU has one device, so the split is declared the way accelerate declares it (hf_device_map)
and the per-device allocator and NVML readings come from a test double (`device_probe`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recorder_helpers import prompt_ids, tiny_model

import kvscope
from kvscope.recorder.devices import layer_devices
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace

MIB = 1 << 20
NEW = 6


class FakeDevices:
    """Two devices whose allocated bytes grow with every reading: cuda:1 has half the memory."""

    devices = ("cuda:0", "cuda:1")

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> list[tuple[str, int, int, int, int, int]]:
        self.reads += 1
        out = []
        for i, device in enumerate(self.devices):
            allocated = (100 + 10 * self.reads) * MIB * (i + 1)
            out.append((device, allocated, allocated + 8 * MIB, MIB, allocated + 300 * MIB, (1024 >> i) * MIB))
        return out


def _split(model: torch.nn.Module) -> None:
    layers = model.config.num_hidden_layers
    model.hf_device_map = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < layers // 2 else 1
                                                       for i in range(layers)}, "model.norm": 1, "lm_head": 1}


def test_layer_devices_reads_hf_device_map() -> None:
    model = tiny_model("llama")
    assert layer_devices(model, model.config.num_hidden_layers) is None  # one device: nothing per device
    _split(model)
    assert layer_devices(model, 2) == ["cuda:0", "cuda:1"]
    model.hf_device_map = {"model": 0}
    assert layer_devices(model, 2) is None  # every layer on cuda:0 through its parent


def test_a_split_model_records_per_device_rows(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    model = tiny_model("llama")
    _split(model)
    probe = FakeDevices()
    path = tmp_path / "trace"
    expected = model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    with kvscope.record(model, path, writer="thread", nvml=False, device_probe=probe) as rec:
        out = model.generate(prompt_ids(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        assert torch.equal(out, expected)
        rec.settle()
    trace = open_trace(path)
    assert check_invariants(trace).ok
    owners = trace.read("layer_devices").to_pydict()
    assert list(zip(owners["layer"], owners["device"], strict=True)) == [(0, "cuda:0"), (1, "cuda:1")]
    rows = trace.read("device_steps").to_pylist()
    steps = sorted({r["step"] for r in rows})
    assert steps == [-2, -1, *range(NEW)]  # released, baseline, every step
    assert all(sum(1 for r in rows if r["step"] == s) == 2 for s in steps)  # one row per device per step
    assert {r["nvml_total_bytes"] for r in rows if r["device"] == "cuda:1"} == {512 * MIB}
    # the analyser's per-device KV equals an independent count: this device's layers' bytes
    from kvscope.analyzer.detectors.device_memory import measure
    from kvscope.analyzer.load import load_traces

    with load_traces([path]) as t:
        measured = {r["device"]: r for r in measure(t).devices}
        per_layer = dict(t.rows("SELECT layer, max(kv_bytes) FROM layers GROUP BY layer"))
    config = model.config
    tokens = prompt_ids().shape[1] + NEW - 1  # the cache after the last forward pass
    layer_bytes = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * tokens * 4
    assert per_layer == {0: layer_bytes, 1: layer_bytes}
    assert measured["cuda:0"]["kv_bytes"] == measured["cuda:1"]["kv_bytes"] == layer_bytes
    assert measured["cuda:1"]["layers"] == 1 and measured["cuda:1"]["total"] == 512 * MIB
    # the double has cuda:1 use twice as much with half the memory: it is named first
    first = [f for f in kvscope.analyze([path]).findings if f.metric == "first_device_tokens_to_oom"]
    assert len(first) == 1 and first[0].evidence["device"] == "cuda:1"


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        with kvscope.record(model, f"{out}/rank-{rank}", writer="thread", nvml=False):
            model.generate(prompt_ids(), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        dist.destroy_process_group()


def test_each_rank_of_a_distributed_job_records_its_rank_and_one_job_id(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(2, init, str(tmp_path / "job")), nprocs=2, join=True)
    rows = [open_trace(tmp_path / "job" / f"rank-{r}").read("run").to_pylist()[0] for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in rows] == [(0, 2), (1, 2)]
    assert rows[0]["job_id"] == rows[1]["job_id"] is not None
