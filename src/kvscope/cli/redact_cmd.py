"""`kvscope redact TRACE -o OUT`: a copy without host, local paths, chosen labels and prompt ids."""

from __future__ import annotations

from pathlib import Path

import click

from kvscope.cli.console import check_output_folder
from kvscope.errors import EXIT_OK


@click.command("redact")
@click.argument("trace", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="A new folder for the redacted copy.")
@click.option("--label", "labels", multiple=True, metavar="KEY", help="Remove this label (repeatable).")
@click.option("--all-labels", is_flag=True, help="Remove every label.")
@click.option("--keep-host", is_flag=True, help="Keep run.host.")
@click.option("--keep-paths", is_flag=True, help="Keep absolute paths in strings.")
@click.option("--keep-prompt-ids", is_flag=True, help="Keep prompt ids (default: a salted hash of each).")
@click.option("--keep-samples", is_flag=True, help="Copy kv_samples (raw tensors) too.")
def redact_command(trace: str, output: str, labels: tuple[str, ...], all_labels: bool, keep_host: bool,
                   keep_paths: bool, keep_prompt_ids: bool, keep_samples: bool) -> int:
    """Write a copy of TRACE for sharing: host, absolute paths, chosen labels, prompt ids and prompt text
    removed, sampled tensors left out; numbers kept, so the analysis is the same."""
    from kvscope.trace.redact import redact_trace
    from kvscope.trace.text import clean

    if not Path(output).exists():  # an existing one is checked by redact_trace (new or empty)
        check_output_folder(output)
    out = redact_trace(trace, output, labels=labels, all_labels=all_labels, keep_host=keep_host,
                       keep_paths=keep_paths, keep_prompt_ids=keep_prompt_ids, keep_samples=keep_samples)
    click.echo(f"redacted copy written to {clean(out, 400)}")
    return EXIT_OK
