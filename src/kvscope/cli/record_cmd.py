"""`kvscope record MODEL -o TRACE`: record a local model or a random-weight twin over prompts."""

from __future__ import annotations

from pathlib import Path

import click

from kvscope.cli.console import check_output_folder, human_bytes, parse_labels, stdout_console
from kvscope.errors import EXIT_OK, UsageError

# Parameter dtypes a model can be recorded in (integer and float8 dtypes are storage formats, not
# dtypes to run a model in).
MODEL_DTYPES = ("bfloat16", "float16", "float32", "float64", "half", "float", "double")
# Files any one of which makes a model directory's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def _cache_implementations() -> tuple[str, ...] | None:
    """The names generate(cache_implementation=...) accepts in this transformers (None: unknown)."""
    try:
        from transformers.generation import configuration_utils as cu
    except ImportError:
        return None
    names = getattr(cu, "ALL_CACHE_IMPLEMENTATIONS", None)
    if names is None:  # older releases: the mapping of names to cache classes, plus "quantized"
        mapping = getattr(cu, "NEED_SETUP_CACHE_CLASSES_MAPPING", None)
        if mapping is None:
            return None
        names = [*mapping, *(["quantized"] if hasattr(cu, "QUANT_BACKEND_CLASSES_MAPPING") else [])]
    return tuple(dict.fromkeys([*names, "dynamic"]))


def _attn_implementations() -> tuple[str, ...] | None:
    """The attention implementations this transformers knows (None: unknown)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return None
    keys = ALL_ATTENTION_FUNCTIONS.valid_keys() if hasattr(ALL_ATTENTION_FUNCTIONS, "valid_keys") \
        else list(ALL_ATTENTION_FUNCTIONS)
    return tuple(dict.fromkeys(["eager", *keys]))


def check_output(output: Path, append: bool) -> None:
    """`-o` names a directory to create, or a trace to add a run to with --append."""
    from kvscope.trace.reader import is_trace_dir

    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: is a file; name a directory for the trace.")
    if output.is_dir() and is_trace_dir(output) and not append:
        raise UsageError(f"-o {output}: already holds a trace; pass --append to add this run to it, "
                         "or name a new directory.")
    if output.is_dir() and not is_trace_dir(output) and any(output.iterdir()):
        raise UsageError(f"-o {output}: is a directory with other files in it, not a trace; name a new directory.")
    check_output_folder(output)


def check_options(model: str | None, twin: str | None, dtype: str | None, device: str | None,
                  cache_implementation: str | None, attn_implementation: str | None,
                  min_new_tokens: int | None, max_new_tokens: int) -> None:
    """The mistakes that can be found before a model loads, each as a UsageError (exit 2)."""
    if min_new_tokens is not None and min_new_tokens > max_new_tokens:
        raise UsageError(f"--min-new-tokens {min_new_tokens} is above --max-new-tokens {max_new_tokens}.")
    if dtype is not None and dtype.removeprefix("torch.") not in MODEL_DTYPES:
        raise UsageError(f"--dtype {dtype}: a model runs in one of bfloat16, float16, float32 "
                         "(integer and float8 dtypes are cache or weight storage formats).")
    if model is not None and twin is None and not model.startswith("builtin:"):  # load_model checks those
        path = Path(model)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UsageError(f"{model}: no such GGUF file.")
        elif not path.is_dir():
            raise UsageError(f"{model}: not a local model directory or .gguf file (for a twin, use --twin NAME).")
        elif not (path / "config.json").is_file():
            if len(list(path.glob("*.gguf"))) != 1:  # a folder holding one GGUF file loads as that file
                raise UsageError(f"{model}: has no config.json, so it is not a Hugging Face model directory "
                                 "(nor a folder of one .gguf file).")
        elif not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(f"{model}: has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                             "tokenizer into the model directory (tokenizer.save_pretrained) or use --twin.")
    if cache_implementation is not None:
        known = _cache_implementations()
        if known is not None and cache_implementation not in known:
            raise UsageError(f"--cache-implementation {cache_implementation}: unknown to transformers; "
                             f"known: {', '.join(known)}.")
    if attn_implementation is not None and "/" not in attn_implementation:  # "org/repo" names a hub kernel
        known = _attn_implementations()
        if known is not None and attn_implementation not in known:
            raise UsageError(f"--attn-implementation {attn_implementation}: unknown to transformers; "
                             f"known: {', '.join(known)}.")
    if device is not None:
        import torch

        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {device}: not a device name; use cpu, cuda or cuda:N.") from None
        if parsed.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}"
                                 f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu.")
            if parsed.index is not None and parsed.index >= torch.cuda.device_count():
                raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s).")



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
@click.option("--append", is_flag=True, help="Add this run to the trace that -o already holds (else refused).")
@click.option("--native", "native_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="The C++ fast path for per-step reads: auto = a cached build on CUDA (build one with "
                   "`python -m kvscope.recorder.native`), on = build it now or fail, off = Python only. Same rows.")
@click.option("--sample-layers", help="Comma-separated layer indices to sample with --sample-kv-every (default: all).")
@click.option("--max-sample-bytes", default=256 * 2**20, show_default=True, type=click.IntRange(min=0),
              help="Budget for all KV samples of the run.")
@click.option("--flush-every", default=64, show_default=True, type=click.IntRange(1, 64),
              help="Steps between part files.")
@click.option("--writer", type=click.Choice(["auto", "process", "thread"]), default="auto", show_default=True,
              help="Who writes the parts: a child process, a thread of this one, or auto (the process, else the thread).")
@click.option("--nvml", "nvml_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="NVML readings: auto = when pynvml answers on CUDA, on = required, off = none.")
@click.option("--nvml-interval-ms", default=1.0, show_default=True, type=click.FloatRange(0.1, 1000),
              help="How often the writer's thread polls NVML.")
@click.option("--store-prompts", is_flag=True, help="Store each prompt's text in generations.prompt_text.")
def record_command(model: str | None, output: Path, twin: str | None, shrink: bool, prompts_file: str | None,
                   limit: int | None, max_new_tokens: int, min_new_tokens: int | None, dtype: str | None,
                   device: str | None, cache_implementation: str | None, attn_implementation: str | None,
                   sample_kv_every: int, head_stats_every: int, labels: tuple[str, ...], append: bool,
                   native_mode: str, sample_layers: str | None, max_sample_bytes: int, flush_every: int, writer: str,
                   nvml_mode: str, nvml_interval_ms: float, store_prompts: bool) -> int:
    """Record the KV cache of MODEL (a local Hugging Face model directory, a .gguf file or builtin:smollm2)
    or of --twin."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvscope.recorder.options import RecordOptions
    from kvscope.workload.record_run import RecordJob, run_record

    if shrink and twin is None:
        raise UsageError("--shrink applies to --twin models only.")
    if model is not None and twin is not None:
        raise UsageError("give either a local model directory or --twin NAME_OR_CONFIG_JSON (one of them).")
    check_output(output, append)
    check_options(model, twin, dtype, device, cache_implementation, attn_implementation, min_new_tokens,
                  max_new_tokens)
    if min_new_tokens is None and twin is not None:
        min_new_tokens = max_new_tokens  # random weights may emit EOS at once
    switch = {"auto": "auto", "on": True, "off": False}
    options = RecordOptions(labels=parse_labels(labels), sample_kv_every=sample_kv_every,
                            sample_layers=_layer_list(sample_layers), max_sample_bytes=max_sample_bytes,
                            flush_every=flush_every, nvml=switch[nvml_mode], nvml_interval_ms=nvml_interval_ms,
                            store_prompts=store_prompts, head_stats_every=head_stats_every, writer=writer,
                            native=switch[native_mode])
    job = RecordJob(output=output, model_dir=model, twin=twin, shrink=shrink, prompts_file=prompts_file,
                    limit=limit, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, dtype=dtype,
                    device=device, cache_implementation=cache_implementation,
                    attn_implementation=attn_implementation, options=options)
    import logging

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

        record_log = logging.getLogger("kvscope.record")
        level = record_log.level
        record_log.setLevel(logging.WARNING)  # this command says where the trace went below, after the table
        try:
            result = run_record(job, on_progress)
        finally:
            record_log.setLevel(level)
    _summary(stdout_console(), result)
    console.print(f"trace written to {result.trace}; next: kvscope analyze {result.trace}  "
                  f"(or kvscope report {result.trace} -o report.html)", highlight=False, soft_wrap=True)
    return EXIT_OK


def _layer_list(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--sample-layers {text}: give comma-separated layer indices, e.g. 0,5,11.") from None


def _summary(console: object, result: object) -> None:
    from rich.table import Table

    table = Table(title=f"{result.model_name}: {result.num_layers} layers on {result.device} -> {result.trace}")
    for header in ("gen", "prompt", "tokens in+out", "cache class", "KV at end", "peak allocated", "NVML peak",
                   "KV bytes/token/layer"):
        table.add_column(header, justify="left" if header in ("prompt", "cache class") else "right")
    for gen in result.generations:  # rows read back from the written trace
        per_token = (gen["last_kv_bytes"] / gen["final_seq_len"] / gen["layers_recorded"]
                     if gen["final_seq_len"] and gen["layers_recorded"] else None)
        table.add_row(str(gen["gen_id"]), gen["prompt_id"], f"{gen['prompt_tokens']}+{gen['new_tokens']}",
                      gen["cache_class"], human_bytes(gen["last_kv_bytes"]), human_bytes(gen["peak_allocated_bytes"]),
                      human_bytes(gen["peak_nvml_used_bytes"]), f"{per_token:,.0f}" if per_token is not None else "-")
    console.print(table)  # type: ignore[attr-defined]
