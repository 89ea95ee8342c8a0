"""Twin configs keep their KV geometry when shrunk; `kvscope record` writes a valid trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from packaging.version import Version
from recorder_helpers import TF_VERSION, TINY_CONFIGS

from kvscope.cli.main import main as kvscope
from kvscope.errors import UsageError
from kvscope.trace.invariants import check_invariants
from kvscope.trace.reader import open_trace
from kvscope.twins import kv_geometry, list_twins, load_twin, shrink_config
from kvscope.workload.prompt_set import load_prompts

SHIPPED = {"pythia-1.4b", "gemma-3-4b", "gpt-oss-20b", "gpt-oss-120b", "glm-4.5-air", "glm-4.7-flash",
           "deepseek-v2-lite", "gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b", "gemma-4-31b"}
# Geometry from the design table (shared/design/transformers-caches.md).
EXPECTED = {
    "pythia-1.4b": (24, 16, 128), "gemma-3-4b": (34, 4, 256), "gpt-oss-20b": (24, 8, 64),
    "gpt-oss-120b": (36, 8, 64), "glm-4.5-air": (46, 8, 128), "glm-4.7-flash": (47, 20, None),
    "deepseek-v2-lite": (27, 16, None),
    # Gemma 4: sliding layers' kv heads and head_dim (full layers: global_head_dim 512, tests/lab/test_gemma4_twins.py)
    "gemma-4-e2b": (35, 1, 256), "gemma-4-e4b": (42, 2, 256), "gemma-4-26b-a4b": (30, 8, 256),
    "gemma-4-31b": (60, 16, 256),
}


def test_every_shipped_twin_names_its_source_and_keeps_geometry_when_shrunk() -> None:
    assert set(list_twins()) == SHIPPED
    for name in SHIPPED:
        spec = load_twin(name)
        assert "/" in spec.source, f"{name} must name its source repository"
        geometry = kv_geometry(spec.config)
        assert (geometry["num_hidden_layers"], geometry["num_key_value_heads"], geometry["head_dim"]) == EXPECTED[name]
        shrunk = shrink_config(spec)
        assert kv_geometry(shrunk.config) == geometry
        assert shrunk.config.get("vocab_size", 0) <= 512 and shrunk.dtype == spec.dtype
    assert load_twin("gpt-oss-120b").config["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert load_twin("gemma-3-4b").config["layer_types"][5] == "full_attention"
    mla = kv_geometry(load_twin("glm-4.7-flash").config)
    assert (mla["kv_lora_rank"], mla["qk_nope_head_dim"], mla["qk_rope_head_dim"], mla["v_head_dim"]) == (512, 192, 64, 256)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shrunk_twin_config_builds_with_the_same_layout(name: str) -> None:
    from transformers import AutoConfig

    from kvscope.recorder.model_layout import declared_layer_types

    spec = shrink_config(load_twin(name))
    values = {k: v for k, v in spec.config.items() if k not in ("model_type", "architectures")}
    try:
        config = AutoConfig.for_model(spec.model_type, **values)
    except (KeyError, ValueError):
        pytest.skip(f"transformers {TF_VERSION} has no {spec.model_type}")
    assert config.num_hidden_layers == spec.config["num_hidden_layers"]
    declared = declared_layer_types(config)
    if "layer_types" in spec.config and TF_VERSION >= Version("4.53"):
        assert declared == spec.config["layer_types"]


def test_unknown_twin_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown twin"):
        load_twin("no-such-model")


def test_builtin_prompts_are_fifteen_graded() -> None:
    prompts = load_prompts()
    lengths = [len(p.text) for p in prompts]
    assert len(prompts) == 15 and lengths == sorted(lengths) and lengths[0] < 64 < 4096 < lengths[-1]
    assert len({p.id for p in prompts}) == 15


def _tiny_twin(tmp_path: Path, prompt_lines: str) -> tuple[dict, Path, Path]:
    """A twin config file of a tiny gpt_neox and a prompts file: (config, twin file, prompts file)."""
    config = dict(TINY_CONFIGS["gpt_neox"], model_type="gpt_neox")
    twin = tmp_path / "tiny.json"
    twin.write_text(json.dumps({"name": "tiny-neox", "source": "tests", "dtype": "float32", "config": config}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(prompt_lines)
    return config, twin, prompts


def test_record_cli_with_a_twin_config_file(tmp_path: Path) -> None:
    _, twin, prompts = _tiny_twin(tmp_path, '{"id": "a", "text": "hello"}\n{"id": "b", "text": "a longer prompt"}\n')
    out = tmp_path / "trace"
    code = kvscope(["record", "--twin", str(twin), "--prompts", str(prompts), "--max-new-tokens", "6",
                    "--device", "cpu", "--label", "k=v", "-o", str(out)])
    assert code == 0
    trace = open_trace(out)
    assert check_invariants(trace).ok
    run = trace.read("run").to_pylist()[0]
    assert run["tokenizer"].startswith("byte-level") and json.loads(run["labels"]) == {"k": "v"}
    assert json.loads(run["options"])["compile"]
    gens = trace.read("generations").sort_by("gen_id").to_pylist()
    assert [(g["prompt_id"], g["prompt_tokens"], g["new_tokens"]) for g in gens] == [("a", 5, 6), ("b", 15, 6)]
    assert kvscope(["inspect", str(out)]) == 0


def test_record_cli_rejects_two_model_sources(tmp_path: Path) -> None:
    assert kvscope(["record", str(tmp_path), "--twin", "pythia-1.4b", "-o", str(tmp_path / "t")]) == 2


def test_record_cli_with_a_local_model_directory(tmp_path: Path) -> None:
    from recorder_helpers import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "the", "cache", "grows", "with", "every", "token"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "w", "text": "the cache grows with every token"}\n')
    out = tmp_path / "trace"
    code = kvscope(["record", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "4",
                    "--min-new-tokens", "4", "--device", "cpu", "-o", str(out)])
    assert code == 0
    trace = open_trace(out)
    run = trace.read("run").to_pylist()[0]
    assert run["model_name"] == "model" and run["tokenizer"].endswith(f"from {model_dir}")
    generation = trace.read("generations").to_pylist()[0]
    assert (generation["prompt_tokens"], generation["new_tokens"]) == (6, 4)


def test_prompt_files_accept_common_jsonl_shapes(tmp_path: Path) -> None:
    from kvscope.errors import UsageError
    from kvscope.workload.prompt_set import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "one"}\n{"prompt_id": "b", "prompt": "two"}\n\n"three"\n')
    assert [(p.id, p.text) for p in load_prompts(path)] == [("a", "one"), ("b", "two"), ("prompt-4", "three")]
    path.write_text('{"question": "no text here"}\n')
    with pytest.raises(UsageError, match='line 1 needs a string, or an object with a "text"'):
        load_prompts(path)


def test_the_record_summary_is_read_from_the_written_trace(tmp_path: Path) -> None:
    from kvscope.trace.summary import read_summary
    from kvscope.workload.record_run import RecordJob, run_record

    config, twin, prompts = _tiny_twin(tmp_path, '{"id": "a", "text": "hello"}\n')
    out = tmp_path / "trace"
    first = run_record(RecordJob(out, twin=str(twin), prompts_file=str(prompts), max_new_tokens=3, device="cpu"))
    second = run_record(RecordJob(out, twin=str(twin), prompts_file=str(prompts), max_new_tokens=5, device="cpu"))
    runs = open_trace(out).read("run").to_pylist()
    assert len(runs) == 2  # two runs in one trace: each summary is its own run's rows only
    for result, new in ((first, 3), (second, 5)):
        assert (result.num_layers, result.device, result.nvml_total) == (config["num_hidden_layers"], "cpu", None)
        (gen,) = result.generations
        assert (gen["prompt_id"], gen["prompt_tokens"], gen["new_tokens"]) == ("a", 5, new)
        assert gen["final_seq_len"] == 5 + new - 1  # the last step's context (its own token not yet cached)
        assert gen["layers_recorded"] == config["num_hidden_layers"] and gen["last_kv_bytes"] > 0
    assert sorted(read_summary(out, run["run_id"]).generations[0]["new_tokens"] for run in runs) == [3, 5]
