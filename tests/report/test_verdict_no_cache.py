"""A run whose cache the recorder never saw gets "no cache seen" in its verdict, not "0 B, static"."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvscope  # noqa: E402

NEW = 5


def _model() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def _record(path: Path, use_cache: list[bool]) -> Path:
    model = _model()
    ids = torch.arange(3, 19).reshape(1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the recorder's own "no cache seen" warning
        with kvscope.record(model, path, writer="thread", nvml=False) as rec:
            for cached in use_cache:
                model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=cached)
                rec.settle()
    return path


def test_a_run_without_any_cache_seen_says_so(tmp_path: Path) -> None:
    run = kvscope.analyze([_record(tmp_path / "t", [False, False])]).verdict.worst
    assert run is not None and not run.healthy
    kv = run.aspect("kv_cache")
    assert (kv.status, kv.label) == ("warning", "no cache seen")
    assert "generations 0-1" in kv.text and "0 B of KV say nothing" in kv.text


def test_a_run_with_a_cache_in_one_generation_keeps_its_kv_reading(tmp_path: Path) -> None:
    run = kvscope.analyze([_record(tmp_path / "t", [False, True])]).verdict.worst
    assert run is not None
    kv = run.aspect("kv_cache")
    assert kv.label != "no cache seen"
    assert kv.status == "warning"  # generation 0's cache_seen warning still counts
