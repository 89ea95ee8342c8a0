"""The fault lab on CPU: each condition that CPU can show is planted for real and flagged by its
detector; the healthy controls raise no warning; CUDA-only scenarios are skipped with the reason."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from kvscope.analyzer import analyze, load_traces
from kvscope.analyzer.registry import get_detector
from kvscope.analyzer.tune import read_labels, sweep
from kvscope.cli.main import main
from kvscope.lab import SCENARIOS, LabSettings, run_lab, scenario_names

CPU_SET = ["preallocated", "float32_layer", "window_not_honoured", "dead_head", "healthy_dynamic",
           "healthy_never_settled", "healthy_static", "interleaved_growth", "oom_fraction"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    with pytest.MonkeyPatch.context() as env:
        # dead_head's head statistics with the kernels' PyTorch reference: the Triton interpreter
        # took 180 of the lab's 200 s here (tests/kernels holds the two backends equal)
        env.setenv("TRITON_INTERPRET", "0")
        _run_cpu_lab(out)
    return out


def _run_cpu_lab(out: Path) -> None:
    # 6 of gpt-oss-20b's layers (3 sliding, 3 full: enough peers for layer_anomaly); one prompt of
    # 48 tokens and 96 new ones crosses the 128-token window
    run_lab(out, LabSettings(device="cpu", layers=6, prompt_tokens=(48,), new_tokens=96), CPU_SET)


def _warnings(trace: Path) -> dict[str, set[str]]:
    with load_traces([trace]) as tables:
        lab_of = {r: json.loads(labels)["lab"] for r, labels in tables.rows("SELECT run_id, labels FROM run")}
        found: dict[str, set[str]] = {name: set() for name in lab_of.values()}
        for f in analyze(tables):
            if f.severity != "info":
                found[lab_of[f.run_id]].add(f.detector)
    return found


@pytest.mark.slow
def test_cpu_plants_are_flagged_by_their_detector_only_and_controls_are_quiet(lab: Path) -> None:
    found = _warnings(lab)
    assert found == {"preallocated": {"preallocation_waste"}, "float32_layer": {"layer_anomaly"},
                     "window_not_honoured": {"layer_uniformity"}, "dead_head": {"dead_heads"},
                     "healthy_dynamic": set(), "healthy_never_settled": set(), "healthy_static": set()}


@pytest.mark.slow
def test_runs_are_labelled_and_cuda_only_scenarios_say_why_they_were_skipped(lab: Path) -> None:
    summary = {r["scenario"]: r for r in json.loads((lab / "lab.json").read_text())}
    assert summary["interleaved_growth"]["skipped"].startswith("interleaved_growth needs CUDA")
    assert summary["oom_fraction"]["run_id"] is None and not (lab / "oom_fraction").exists()
    with load_traces([lab]) as tables:
        rows = tables.records("SELECT run_id, labels, options FROM run")
        settled = tables.records("""SELECT r.labels, g.post_release_allocated_bytes, g.post_empty_cache_nvml_used_bytes,
                                    g.gen_id FROM generations g JOIN run r USING (run_id)""")
    labels = {json.loads(r["labels"])["lab"]: json.loads(r["labels"]) for r in rows}
    assert labels["float32_layer"] == {"lab": "float32_layer", "planted": "yes", "expected": "layer_anomaly",
                                       "condition": "one full layer's cache stored in float32", "lab_device": "cpu"}
    assert labels["healthy_dynamic"]["planted"] == "no" and labels["healthy_dynamic"]["expected"] == ""
    assert all(json.loads(r["options"])["lab"] == json.loads(r["labels"])["lab"] for r in rows)
    # the never-settled run still has its generation row (written at the end of the block)
    assert [s["gen_id"] for s in settled if json.loads(s["labels"])["lab"] == "healthy_never_settled"] == [0]
    with (lab / "labels.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 7 * 9  # 7 recorded runs x 9 lab detectors
    assert {(r["scenario"], r["detector"]) for r in table if r["expected"] == "1"} == {
        ("preallocated", "preallocation_waste"), ("float32_layer", "layer_anomaly"),
        ("window_not_honoured", "layer_uniformity"), ("dead_head", "dead_heads")}


@pytest.mark.slow
def test_the_labels_feed_tune(lab: Path) -> None:
    det = get_detector("layer_anomaly")
    labels = read_labels(lab / "labels.csv", "layer_anomaly")
    with load_traces([lab]) as tables:
        rows = sweep(tables, det, det.default_config(), "z_threshold", [3.0, 200.0], labels)
    assert [(r.value, r.tp, r.fp, r.fn, r.tn) for r in rows] == [(3.0, 1, 0, 0, 6), (200.0, 0, 0, 1, 6)]
    assert rows[0].best and rows[0].precision == 1.0 and rows[0].recall == 1.0


def test_the_lab_command_lists_scenarios_and_refuses_unknown_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "-o", str(tmp_path / "x"), "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in scenario_names())
    assert "oom_event, oom_forecast" in listed and "CUDA only" in listed
    assert main(["lab", "-o", str(tmp_path / "y"), "-s", "no_such_thing"]) == 2
    assert "unknown lab scenario(s) no_such_thing" in capsys.readouterr().err
    assert main(["lab", "-o", str(tmp_path / "z"), "--device", "cuda:0", "-s", "healthy_dynamic"]) == (
        0 if __import__("torch").cuda.is_available() else 2)
    capsys.readouterr()
    for bad, says in ((["--layers", "0"], "--layers 0: keep at least 1 layer"),
                      (["--new-tokens", "0"], "--new-tokens 0: generate at least 1 token."),
                      (["--prompt-tokens", "0,48"], "give one or more lengths of at least 1 token.")):
        assert main(["lab", "-o", str(tmp_path / "bad"), "-s", "healthy_dynamic", *bad]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()  # refused before anything was made


def test_every_planted_scenario_names_a_registered_detector() -> None:
    for s in SCENARIOS:
        assert s.planted == bool(s.expected), s.name
        for name in s.expected:
            get_detector(name)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: allocator pools and memory fractions")
def test_the_cuda_conditions_on_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "lab"
    run_lab(out, LabSettings(device="cuda", prompt_tokens=(64, 200), new_tokens=128),
            ["interleaved_growth", "oom_fraction", "healthy_fraction", "kept_attentions"])
    found = _warnings(out)
    assert "fragmentation" in found["interleaved_growth"]
    assert {"oom_event", "oom_forecast"} <= found["oom_fraction"]
    assert "growth_curve" in found["kept_attentions"]
    assert found["healthy_fraction"] == set()
    with load_traces([out]) as tables:
        limits = dict(tables.rows("SELECT json_extract_string(labels, '$.lab'), memory_limit_bytes FROM run"))
    assert limits["oom_fraction"] > 0 and limits["healthy_fraction"] > limits["oom_fraction"]


@pytest.mark.slow
def test_a_twin_without_sliding_layers_or_separate_projections_plants_what_it_can(tmp_path: Path) -> None:
    """GPT-NeoX (pythia): one fused query_key_value and no declared layer types. The dead head is
    planted in the fused projection's K and V rows; the unhonoured window is skipped, with why."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "0")
        results = run_lab(tmp_path, LabSettings(device="cpu", twin="pythia-1.4b", layers=3, prompt_tokens=(24,),
                                                new_tokens=20), ["dead_head", "float32_layer", "window_not_honoured"])
    skipped = {r.name: r.skipped for r in results}
    assert skipped == {"float32_layer": None, "dead_head": None,
                       "window_not_honoured": "window_not_honoured needs declared sliding-window layers; "
                                              "gpt_neox declares none"}
    assert _warnings(tmp_path) == {"dead_head": {"dead_heads"}, "float32_layer": {"layer_anomaly"}}


def test_zero_head_zeroes_the_k_and_v_rows_of_a_fused_projection_only() -> None:
    from kvscope.lab.scenarios import build_model, zero_head

    model = build_model(LabSettings(device="cpu", twin="pythia-1.4b", layers=2, dtype="float32"))
    fused = model.gpt_neox.layers[1].attention.query_key_value
    dim = model.gpt_neox.layers[1].attention.head_size
    zero_head(model, 1, 1)
    rows = fused.weight.abs().sum(dim=1).reshape(-1, 3, dim)  # per head: q, k, v rows
    assert (rows[1, 1:] == 0).all() and (rows[1, 0] > 0).all()  # head 1's K and V zero, its Q kept
    assert (rows[0] > 0).all() and (rows[2:] > 0).all()  # every other head untouched


def test_an_unhonoured_window_is_planted_only_where_the_context_outgrows_the_window() -> None:
    from types import SimpleNamespace

    from kvscope.lab.scenarios import unfit

    gemma = SimpleNamespace(config=SimpleNamespace(model_type="gemma3", sliding_window=1024,
                                                   layer_types=["sliding_attention"] * 5 + ["full_attention"]))
    short = LabSettings(prompt_tokens=(48, 80, 112), new_tokens=96)
    assert unfit("window_not_honoured", gemma, short) == (
        "window_not_honoured needs a context longer than the 1024-token window; the longest here is 208 tokens "
        "(raise --prompt-tokens or --new-tokens)")
    assert unfit("window_not_honoured", gemma, LabSettings(prompt_tokens=(1000,), new_tokens=64)) is None
    assert unfit("healthy_dynamic", gemma, short) is None


def test_twins_cut_to_fewer_layers_keep_a_valid_geometry_and_the_lab_plants_where_it_can() -> None:
    from types import SimpleNamespace

    from kvscope.lab.scenarios import _layer_with_peers, _shared_layers_kept, _twin, build_model, unfit

    # gemma-4-e2b: 20 of 35 layers reuse an earlier layer's cache; cut to 6 ([s, s, s, s, f, f]) the
    # layers before the shared ones must hold both types: one shared layer is left
    assert _shared_layers_kept({"num_kv_shared_layers": 20, "num_hidden_layers": 6,
                                "layer_types": ["sliding_attention"] * 4 + ["full_attention"] * 2}) == 1
    settings = LabSettings(device="cpu", twin="gemma-4-e2b", layers=8, dtype="float32")
    cfg = _twin(settings).config
    assert cfg["vocab_size"] == cfg["vocab_size_per_layer_input"] == 32000  # the per-layer embeddings read the ids
    model = build_model(settings)
    assert unfit("dead_head", model, settings) == ("dead_head needs a second kv head with its own k/v projections "
                                                   "in layer 1; gemma4_text's has none (one kv head, or MLA latents)")
    # layer_anomaly needs peers of the odd layer's type: one full layer among sliding ones has none
    one_full = SimpleNamespace(config=SimpleNamespace(layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                                      num_hidden_layers=6))
    assert _layer_with_peers(one_full) == 2
    pythia = SimpleNamespace(config=SimpleNamespace(layer_types=None, num_hidden_layers=24))
    assert _layer_with_peers(pythia) == 12
    # the whole gemma-4-e2b (35 layers, full at 4, 9, ..., 34; the last 20 KV-shared): the odd layer
    # is one of the 15 that own a cache (on the H200, layer 19 raised IndexError in DynamicCache.layers)
    full = _twin(LabSettings(device="cpu", twin="gemma-4-e2b")).config
    whole = SimpleNamespace(config=SimpleNamespace(**{k: full[k] for k in (
        "layer_types", "num_hidden_layers", "num_kv_shared_layers")}))
    assert (full["num_hidden_layers"], full["num_kv_shared_layers"]) == (35, 20)
    assert _layer_with_peers(whole) == 9
    # gemma-4-e4b cut to 4 layers: transformers forces the last one to full attention, so the cut
    # says so and no layer is left KV-shared (one reading a full layer's cache that none produced
    # failed to build: "The set of layer types producing a cache is different ...")
    e4b = LabSettings(device="cpu", twin="gemma-4-e4b", layers=4, dtype="float32")
    cfg = _twin(e4b).config
    assert cfg["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"] and cfg["num_kv_shared_layers"] == 0
    assert build_model(e4b).config.layer_types == cfg["layer_types"]


def test_the_whole_cache_copy_keeps_every_layer_the_cache_fills_on_a_kv_sharing_twin() -> None:
    """cache_copy_callback on Gemma 4 (its last layers read an earlier layer's cache and fill none):
    the copy takes each filled layer's K and V per step, and never indexes past the cache's list
    (at full depth on the H200 it raised IndexError when it walked num_hidden_layers)."""
    from transformers import DynamicCache, LogitsProcessorList

    from kvscope.lab.scenarios import _ids, _KeepKeys, build_model

    settings = LabSettings(device="cpu", twin="gemma-4-e2b", layers=8, dtype="float32")
    model = build_model(settings)
    cache = DynamicCache(config=model.config)
    keep = _KeepKeys(cache, None, values=True)
    model.generate(_ids(model, 12, 0), max_new_tokens=3, min_new_tokens=3, do_sample=False, past_key_values=cache,
                   logits_processor=LogitsProcessorList([keep]))
    filled = [layer for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    assert model.config.num_kv_shared_layers == 3 and len(filled) == 5
    assert len(keep.kept) == 3 * 2 * len(filled)  # 3 steps, K and V of each filled layer
    # layers named past the cache's list are skipped, not an IndexError
    beyond = _KeepKeys(cache, [0, 40], values=False)
    beyond(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 4))
    assert len(beyond.kept) == 1
