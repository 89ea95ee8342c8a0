"""`kvscope lab -o DIR`: plant each memory condition for real in a twin and record labelled traces."""

from __future__ import annotations

import click

from kvscope.cli.console import check_output_folder
from kvscope.errors import EXIT_OK


@click.command("lab")
@click.option("-o", "--output", "output", default=None, type=click.Path(file_okay=False),
              help="Empty directory: one trace per scenario, labels.csv (for kvscope tune) and lab.json.")
@click.option("--device", default="cpu", show_default=True, help='Torch device: "cuda", "cuda:0" or "cpu".')
@click.option("--twin", default="gpt-oss-20b", show_default=True, help="Shipped twin (shrunk) to plant in.")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--layers", type=int, default=None, help="Keep only the first N layers (smaller, faster; CPU tests).")
@click.option("--new-tokens", type=int, default=96, show_default=True, help="New tokens per generation.")
@click.option("--prompt-tokens", default="48,80,112", show_default=True,
              help="Prompt lengths, one generation each (comma-separated).")
@click.option("-s", "--scenario", "scenarios", multiple=True, help="Only these scenarios (repeatable).")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
def lab_command(output: str | None, device: str, twin: str, dtype: str, layers: int | None, new_tokens: int,
                prompt_tokens: str, scenarios: tuple[str, ...], list_only: bool) -> int:
    """Record the fault lab: kept caches, kept scores, kept attentions, copied keys, fragmentation,
    a real OOM, static and preallocated caches, a float32 layer, an unhonoured window, a dead head,
    and healthy controls. Each run is labelled in run.labels; labels.csv feeds `kvscope tune`.
    Scenarios that need CUDA are skipped on CPU, with the reason."""
    from kvscope.errors import UsageError
    from kvscope.lab import SCENARIOS, LabResult, LabSettings, run_lab

    if list_only:
        for s in SCENARIOS:
            kind = "planted" if s.planted else "control"
            flags = ", ".join(s.expected) or "no warning"
            click.echo(f"{s.name:28s} {kind:8s} {flags:32s} {'CUDA only' if s.needs_cuda else ''}")
        return EXIT_OK
    if output is None:
        raise UsageError("give an output directory: kvscope lab -o DIR (or --list).")
    try:
        lengths = tuple(int(x) for x in prompt_tokens.split(",") if x.strip())
    except ValueError as exc:
        raise UsageError(f"--prompt-tokens {prompt_tokens!r}: give comma-separated integers.") from exc
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--prompt-tokens {prompt_tokens!r}: give one or more lengths of at least 1 token.")
    if layers is not None and layers < 1:
        raise UsageError(f"--layers {layers}: keep at least 1 layer (or leave it out for the twin's own).")
    if new_tokens < 1:
        raise UsageError(f"--new-tokens {new_tokens}: generate at least 1 token.")
    check_output_folder(output)
    settings = LabSettings(device=device, twin=twin, dtype=dtype, layers=layers, prompt_tokens=lengths,
                           new_tokens=new_tokens)

    def progress(r: LabResult) -> None:
        if r.skipped:
            click.echo(f"{r.name}: skipped ({r.skipped})", err=True)
        else:
            click.echo(f"{r.name}: {r.trace} run {r.run_id} in {r.seconds:.1f} s {r.notes or ''}", err=True)

    results = run_lab(output, settings, list(scenarios) or None, progress)
    recorded = sum(1 for r in results if r.run_id)
    click.echo(f"{output}: {recorded} lab traces, {len(results) - recorded} skipped; labels in {output}/labels.csv.")
    return EXIT_OK
