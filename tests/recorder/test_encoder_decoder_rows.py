"""Encoder-decoder generation rows: the decoder's start token (bart's is its EOS) is not a generated
token, and an EOS is reached only when one was generated."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from model_zoo import tiny_case

import kvscope
from kvscope.recorder.generation import generated_tokens
from kvscope.trace.reader import open_trace

NEW = 12


def _generation_row(model: torch.nn.Module, inputs: dict[str, Any], path: Path, **kwargs: Any) -> tuple[dict, Any]:
    with kvscope.record(model, path, writer="thread", nvml=False) as rec:
        out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)
        rec.settle()
    return open_trace(path).read("generations").to_pylist()[0], out


@pytest.mark.parametrize("model_type", ["t5", "bart", "whisper"])
def test_new_tokens_leave_out_the_decoder_start_token(model_type: str, tmp_path: Path) -> None:
    case = tiny_case(model_type)
    row, out = _generation_row(case.model, case.inputs, tmp_path / "trace")
    assert row["new_tokens"] == NEW
    assert row["prompt_tokens"] == 1  # the decoder's prefill: its start token
    steps = open_trace(tmp_path / "trace").read("steps").num_rows
    assert steps == NEW
    start = case.model.generation_config.decoder_start_token_id
    if out.shape[-1] == NEW + 1:  # generate returned the start token: it is not counted
        assert int(out[0, 0]) == start


def test_bart_eos_reached_only_when_generated(tmp_path: Path) -> None:
    case = tiny_case("bart")  # forced_eos_token_id=None: nothing forces an EOS at max_length
    config = case.model.generation_config
    assert config.decoder_start_token_id == config.eos_token_id == 2
    row, out = _generation_row(case.model, case.inputs, tmp_path / "plain")
    generated = out[0, -NEW:].tolist()
    assert 2 not in generated and int(out[0, 0]) == 2  # the start token is bart's EOS
    assert row["eos_reached"] is False and row["new_tokens"] == NEW
    # Forcing EOS as the last token: now one was generated.
    row, out = _generation_row(case.model, case.inputs, tmp_path / "forced", forced_eos_token_id=2)
    assert int(out[0, -1]) == 2 and row["eos_reached"] is True and row["new_tokens"] == NEW


def _model(encoder_decoder: bool, eos: int = 2) -> Any:
    return SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=encoder_decoder),
                           generation_config=SimpleNamespace(eos_token_id=eos))


def test_generated_tokens_by_output_shape() -> None:
    seqs = torch.tensor([[2, 5, 6, 7]])
    # bart-like: start token returned, 3 steps
    assert generated_tokens(_model(True), seqs, (), {}, 3, 1) == (3, False)
    # whisper-on-4.x-like: the start token stripped from what generate returned
    assert generated_tokens(_model(True), seqs[:, 1:], (), {}, 3, 1) == (3, False)
    # decoder_input_ids of 2 tokens and 2 steps; an EOS among the generated ones
    with_eos = torch.tensor([[0, 9, 2, 5]])
    assert generated_tokens(_model(True), with_eos, (), {"decoder_input_ids": torch.tensor([[0, 9]])}, 2, 2) \
        == (2, True)
    # no steps recorded: decoder_input_ids, else the first forward's tokens, else the start token
    assert generated_tokens(_model(True), seqs, (), {}, 0, None) == (3, False)
    assert generated_tokens(_model(True), seqs, (), {}, 0, 2) == (2, False)
    # decoder-only: the prompt is input_ids
    assert generated_tokens(_model(False), torch.tensor([[4, 4, 2, 5]]), (), {"input_ids": torch.tensor([[4, 4]])},
                            2) == (2, True)
