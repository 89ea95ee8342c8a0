"""`kvscope record MODEL -o TRACE`: record a local model or a random-weight twin over prompts."""

from __future__ import annotations

from pathlib import Path

import click

from kvscope.cli.console import stdout_console
from kvscope.errors import EXIT_OK, UsageError


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label takes key=value, got {item!r}.")
        labels[key] = value
    return labels


@click.command("record")
@click.argument("model", required=False)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Trace directory to write.")
@click.option("--twin", help="Twin name (e.g. gpt-oss-20b) or a JSON config: random weights, real KV geometry.")
@click.option("--shrink", is_flag=True, help="Twin only: shrink MLP, experts and vocabulary; KV geometry unchanged.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="JSONL prompts (default: built-in 15).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N prompts.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--min-new-tokens", type=click.IntRange(min=0), help="Default: --max-new-tokens for twins.")
@click.option("--dtype", help="bfloat16, float16, float32 (default: the twin's or model's own).")
@click.option("--device", help="cuda, cuda:1, cpu (default: cuda when available).")
@click.option("--cache-implementation", help="generate(cache_implementation=...), e.g. static, dynamic, quantized.")
@click.option("--attn-implementation", help="eager, sdpa, flash_attention_2, ...")
@click.option("--sample-kv-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Copy K/V of every layer every N steps into kv_samples (0 = off).")
@click.option("--head-stats-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Per-head norms, attention entropy and low-mass fraction every N steps into head_stats (0 = off).")
@click.option("--label", "labels", multiple=True, help="key=value stored with the run (repeatable).")
@click.option("--native", "native_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="The C++ fast path for per-step reads: auto = a cached build on CUDA (else built in the "
                   "background for later runs), on = build it now or fail, off = Python only. Same rows either way.")
def record_command(model: str | None, output: Path, twin: str | None, shrink: bool, prompts_file: str | None,
                   limit: int | None, max_new_tokens: int, min_new_tokens: int | None, dtype: str | None,
                   device: str | None, cache_implementation: str | None, attn_implementation: str | None,
                   sample_kv_every: int, head_stats_every: int, labels: tuple[str, ...], native_mode: str) -> int:
    """Record the KV cache of MODEL (a local Hugging Face model directory) or of --twin."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvscope.recorder.runner import RecordJob, run_record

    if shrink and twin is None:
        raise UsageError("--shrink applies to --twin models only.")
    if min_new_tokens is None and twin is not None:
        min_new_tokens = max_new_tokens  # random weights may emit EOS at once
    job = RecordJob(output=output, model_dir=model, twin=twin, shrink=shrink, prompts_file=prompts_file,
                    limit=limit, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, dtype=dtype,
                    device=device, cache_implementation=cache_implementation,
                    attn_implementation=attn_implementation, sample_kv_every=sample_kv_every,
                    head_stats_every=head_stats_every,
                    labels=_labels(labels), native={"auto": "auto", "on": True, "off": False}[native_mode])
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, int] = {}

        def on_progress(event: str, index: int, value: int) -> None:
            if event == "start":
                tasks["prompts"] = progress.add_task("prompts", total=value)
            elif event == "prompt":
                if "tokens" in tasks:
                    progress.remove_task(tasks.pop("tokens"))
                progress.update(tasks["prompts"], completed=index)
                tasks["tokens"] = progress.add_task(f"  prompt {index} ({value} tokens) new tokens",
                                                    total=max_new_tokens)
            elif event == "token":
                progress.advance(tasks["tokens"])
            elif event == "done" and "prompts" in tasks:
                progress.update(tasks["prompts"], completed=index + 1)

        result = run_record(job, on_progress)
    _summary(stdout_console(), result)
    return EXIT_OK


def _summary(console: object, result: object) -> None:
    from rich.table import Table

    table = Table(title=f"{result.model_name}: {result.num_layers} layers on {result.device} -> {result.trace}")
    for header in ("gen", "prompt", "tokens in+out", "cache class", "KV at end", "peak allocated", "NVML peak",
                   "KV bytes/token/layer"):
        table.add_column(header, justify="left" if header in ("prompt", "cache class") else "right")
    for gen in result.generations:
        per_token = (gen.last_kv_bytes / gen.final_seq_len / gen.layers_recorded
                     if gen.final_seq_len and gen.layers_recorded else None)
        table.add_row(str(gen.gen_id), gen.prompt_id, f"{gen.prompt_tokens}+{gen.new_tokens}", gen.cache_class,
                      _human(gen.last_kv_bytes), _human(gen.peak[0]), _human(gen.peak[2]),
                      f"{per_token:,.0f}" if per_token is not None else "-")
    console.print(table)  # type: ignore[attr-defined]
