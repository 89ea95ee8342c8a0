"""`kvscope record`: user mistakes are one-line usage errors (exit 2) found before a model loads; an
existing trace is refused unless --append; a finished recording says where the trace went and what next."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kvscope.cli.main import main
from kvscope.trace.reader import open_trace
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

TINY = {"name": "tiny-llama", "source": "tests", "dtype": "float32",
        "config": {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}


@pytest.fixture
def twin(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "text": "hello"}\n')
    return path


def _usage_error(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                 match: str) -> None:
    import kvscope.ppl.models as models

    def never(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(models, "load_model", never)
    assert main(["record", *args]) == 2
    # kvscope's own output is one line (importing transformers may log torch warnings of its own before it)
    ours = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("kvscope")]
    assert len(ours) == 1 and ours[0].startswith("kvscope: error: ") and match in ours[0], ours


def test_mistakes_are_usage_errors_before_the_model_loads(tmp_path: Path, twin: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    import torch

    out = str(tmp_path / "new")
    base = ["--twin", str(twin), "-o", out]
    if not torch.cuda.is_available():
        _usage_error([*base, "--device", "cuda"], capsys, monkeypatch, "CUDA is not available here")
    _usage_error([*base, "--device", "tpu:0:x"], capsys, monkeypatch, "not a device name")
    _usage_error([*base, "--dtype", "int8"], capsys, monkeypatch, "--dtype int8")
    _usage_error([*base, "--dtype", "float8_e4m3fn"], capsys, monkeypatch, "--dtype")
    _usage_error([*base, "--cache-implementation", "statik"], capsys, monkeypatch, "known: ")
    _usage_error([*base, "--attn-implementation", "fast"], capsys, monkeypatch, "--attn-implementation fast")
    _usage_error([*base, "--min-new-tokens", "9", "--max-new-tokens", "4"], capsys, monkeypatch,
                 "--min-new-tokens 9 is above --max-new-tokens 4")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _usage_error(["--twin", str(twin), "-o", str(a_file)], capsys, monkeypatch, "is a file")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    _usage_error([str(model_dir), "-o", out], capsys, monkeypatch, "has no tokenizer")
    _usage_error([str(tmp_path / "nowhere"), "-o", out], capsys, monkeypatch, "not a local model directory")


def test_an_existing_trace_is_refused_unless_append(tmp_path: Path, twin: Path, prompts: Path, capsys,  # noqa: ANN001
                                                    monkeypatch) -> None:  # noqa: ANN001
    existing = build_synthetic_trace(tmp_path / "existing", SynthSpec(run_id="first", steps=16))
    _usage_error(["--twin", str(twin), "-o", str(existing)], capsys, monkeypatch, "already holds a trace")
    monkeypatch.undo()
    args = ["record", "--twin", str(twin), "--prompts", str(prompts), "--max-new-tokens", "3", "--device", "cpu",
            "-o", str(existing), "--append"]
    assert main(args) == 0
    runs = open_trace(existing).read("run").column("run_id").to_pylist()
    assert len(runs) == 2 and "first" in runs
    out = capsys.readouterr()
    assert f"trace written to {existing}; next: kvscope analyze {existing}" in out.err


def test_the_record_block_says_where_the_trace_went(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import kvscope

    config = AutoConfig.for_model("llama", **{k: v for k, v in TINY["config"].items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    path = tmp_path / "block"
    with caplog.at_level(logging.INFO, logger="kvscope"), kvscope.record(model, path):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "kvscope.record"]
    assert messages == [f"kvscope: recorded 1 generation into {path}; next: kvscope analyze {path}  "
                        f"(or kvscope report {path} -o report.html)"]
