"""`kvscope ppl MODEL --text FILE|builtin:wiki --quantize none,int8`: perplexity, native vs quantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kvscope.cli.console import human_bytes, parse_labels, stdout_console
from kvscope.errors import EXIT_OK, UsageError

if TYPE_CHECKING:
    from kvscope.ppl.evaluate import PplResult
    from kvscope.ppl.quantize import Variant
    from kvscope.ppl.text import TextChunk




def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a device name; use cpu, cuda or cuda:N.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: kvscope ppl runs on cpu or cuda.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu.")


def _check_output(output: Path, variants: list[str]) -> None:
    from kvscope.cli.record_cmd import check_output

    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: is a file; name a directory (each variant's trace goes into a folder of it).")
    for name in variants:
        check_output(output / name, append=False)


@click.command("ppl")
@click.argument("model", required=False)
@click.option("--twin", help="A twin (random weights, real KV geometry): the memory columns only; its PPL is a "
                             "sanity check near the vocabulary size.")
@click.option("--shrink", is_flag=True, help="Twin only: shrink MLP, experts and vocabulary.")
@click.option("--text", "text_spec", default="builtin:wiki", show_default=True,
              help="A UTF-8 text file, or builtin:wiki (Wikipedia, from the gensim 4.4.0 wheel).")
@click.option("--chars", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Use the first N characters of the text.")
@click.option("--quantize", "quantize_spec", default="none,int8", show_default=True,
              help="Comma-separated variants: none, int8 (torchao), int8-quanto, int8-bnb (LLM.int8()).")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--stride", type=int, default=256, show_default=True,
              help="Tokens between window starts (below --window; window - stride tokens of context).")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
@click.option("--dtype", help="Load the model in this dtype (bfloat16, float16, float32; default: its own).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Keep each variant's recorded trace in OUTPUT/<variant> (kvscope diff OUTPUT/none OUTPUT/int8).")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's own; 1 is faster "
                                                            "on a machine shared with other jobs).")
@click.option("--label", "labels", multiple=True, help="key=value stored with each variant's run (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def ppl_command(model: str | None, twin: str | None, shrink: bool, text_spec: str, chars: int, quantize_spec: str,
                window: int, stride: int, device: str | None, dtype: str | None, output: Path | None,
                threads: int | None, labels: tuple[str, ...], fmt: str) -> int:
    """Perplexity of MODEL (a model directory, a .gguf file or builtin:smollm2) or of --twin over a text,
    native and quantized: strided sliding windows, each variant's evaluation recorded by kvscope.

    Prints PPL, its change vs native, tokens/s, weight bytes, peak memory and KV bytes per token per
    layer for each variant. See docs/ppl.md.
    """
    from kvscope.cli.record_cmd import MODEL_DTYPES
    from kvscope.ppl.evaluate import sliding_windows
    from kvscope.ppl.quantize import parse_variants
    from kvscope.ppl.text import load_text

    if model is not None and twin is not None:
        raise UsageError("give either MODEL or --twin NAME (one of them).")
    if model is None and twin is None:
        raise UsageError("give MODEL (a model directory, a .gguf file or builtin:smollm2) or --twin NAME.")
    if shrink and twin is None:
        raise UsageError("--shrink applies to --twin models only.")
    if window <= stride or stride < 1:
        sliding_windows(window + 1, window, stride)  # raises the usage error that says why
    if dtype is not None and dtype.removeprefix("torch.") not in MODEL_DTYPES:
        raise UsageError(f"--dtype {dtype}: use one of bfloat16, float16, float32.")
    variants = parse_variants(quantize_spec)
    run_labels = parse_labels(labels)
    if output is not None:
        _check_output(output, [v.name for v in variants])
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if model is not None and not model.startswith("builtin:") and not Path(model).exists():
        raise UsageError(f"{model}: no such model directory or .gguf file (for a twin, use --twin NAME).")
    chunk = load_text(text_spec, chars)
    return _run(model, twin, shrink, chunk, variants, window, stride, device, dtype, output, run_labels, fmt)


def _run(model: str | None, twin: str | None, shrink: bool, chunk: TextChunk, variants: list[Variant], window: int,
         stride: int, device: str, dtype: str | None, output: Path | None, labels: dict[str, str], fmt: str) -> int:
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvscope.ppl.evaluate import run_ppl
    from kvscope.ppl.models import load_model

    # torchao logs its optional CUDA extensions that a CPU build cannot load, and torch a deprecation
    # of torchao's enum registration, at import: noise for this command.
    for noisy in ("torchao", "torch.utils._pytree"):
        if logging.getLogger(noisy).level == logging.NOTSET:
            logging.getLogger(noisy).setLevel(logging.ERROR)
    console = Console(stderr=True)
    console.print(f"text: {chunk.source}: {chunk.chars:,} characters, sha256 {chunk.sha256}",
                  highlight=False, soft_wrap=True)

    def converting(source: Path, target: Path) -> None:
        console.print(f"converting {source.name} into {target} once (dequantized weights + tokenizer)...",
                      highlight=False, soft_wrap=True)

    with console.status("loading the model..."):
        loaded = load_model(model, twin=twin, shrink=shrink, dtype=dtype, on_convert=converting)
    console.print(f"model: {loaded.name} ({loaded.tokenizer})", highlight=False, soft_wrap=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    record_log = logging.getLogger("kvscope.record")
    level = record_log.level
    record_log.setLevel(logging.WARNING)  # the table below says where the traces went
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            tasks: dict[str, int] = {}

            def on_progress(event: str, name: str, index: int, total: int) -> None:
                if event == "window":
                    if name not in tasks:
                        tasks[name] = progress.add_task(f"{name}: windows", total=total)
                    progress.update(tasks[name], completed=index)

            result = run_ppl(loaded, chunk, variants, window=window, stride=stride, device=device,
                             output=output, labels=labels, progress=on_progress)
    finally:
        record_log.setLevel(level)
    if fmt == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
        return EXIT_OK
    _print(result, output)
    return EXIT_OK


def _print(r: PplResult, output: Path | None) -> None:
    from rich.table import Table

    console = stdout_console()
    title = (f"{r.model} on {r.device} ({r.dtype}): {r.tokens:,} tokens, {r.windows} window{'s' if r.windows != 1 else ''} of {r.window} "
             f"(stride {r.stride}), {r.scored_tokens:,} scored")
    table = Table(title=title)
    for header in ("variant", "PPL", "vs native", "tokens/s", "weight bytes", "peak memory", "KV B/token/layer"):
        table.add_column(header, justify="left" if header == "variant" else "right")
    for v in r.variants:
        delta = "-" if v.name == "none" or v.delta_pct is None else f"{v.delta_pct:+.2f}%"
        table.add_row(v.name, f"{v.ppl:.3f}", delta, f"{v.tokens_per_s:,.0f}", human_bytes(v.weight_bytes),
                      human_bytes(v.peak_bytes), f"{v.kv_bytes_per_token_layer:,.0f}" if v.kv_bytes_per_token_layer else "-")
    console.print(table)
    console.print(f"text: {r.text_source}, {r.text_chars:,} characters, sha256 {r.text_sha256}",
                  highlight=False, soft_wrap=True)
    kind = r.variants[0].peak_kind if r.variants else ""
    console.print(f"peak memory: {kind}; tokens/s: scored tokens per second of forward passes (recorder on)",
                  highlight=False, soft_wrap=True)
    if r.is_twin:
        console.print("a twin has random weights: its PPL only checks the evaluation (near the vocabulary size).",
                      highlight=False)
    if output is not None and len(r.variants) > 1:
        console.print(f"traces: {output}/<variant>; compare: kvscope diff {output}/none {output}/{r.variants[1].name}",
                      highlight=False, soft_wrap=True)
