"""`kvscope kernels TRACE`: per-head statistics from the trace's KV samples, appended to head_stats."""

from __future__ import annotations

import click

from kvscope.errors import EXIT_OK


@click.command("kernels")
@click.argument("trace", type=click.Path())
@click.option("--device", default=None, help='Torch device, e.g. "cuda:0" or "cpu" (default: the GPU if any).')
@click.option("--low-mass-threshold", type=float, default=0.1, show_default=True,
              help="A key is low-mass when its mean attention probability is below this share of 1/Tk.")
@click.option("--replace", is_flag=True, help="Recompute: drop the offline head_stats an earlier run wrote.")
def kernels_command(trace: str, device: str | None, low_mass_threshold: float, replace: bool) -> int:
    """Compute per-head norms, attention entropy, low-mass fractions and latent ranks from kv_samples.

    Appends rows with source "offline" to the trace's head_stats table, for the dead_heads,
    eviction_headroom and mla_latent detectors of `kvscope analyze`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvscope.kernels.offline import compute_head_stats

    console = Console(stderr=True)
    with Progress(TextColumn("kernels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("samples", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = compute_head_stats(trace, device=device, low_mass_threshold=low_mass_threshold,
                                    replace=replace, progress=advance)
    replaced = f", replaced {result.replaced_parts} earlier part(s)" if result.replaced_parts else ""
    click.echo(f"{trace}: {result.rows} head_stats rows from {result.samples} samples "
               f"on {result.device} ({result.backend}){replaced}.")
    return EXIT_OK
