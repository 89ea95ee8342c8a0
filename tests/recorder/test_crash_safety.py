"""A recording killed with SIGKILL mid-generation leaves a trace that `kvscope inspect` accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvscope.cli.main import main as kvscope_main
from kvscope.trace.reader import open_trace

FLUSH_EVERY = 8

CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {helpers!r})
    import torch
    from recorder_helpers import prompt_ids, tiny_model
    import kvscope

    model = tiny_model("gpt_neox")
    # Slow each step down so the parent can kill the process mid-generation.
    model.register_forward_hook(lambda module, args, output: time.sleep(0.01))
    with kvscope.record(model, {path!r}, flush_every={flush_every}) as rec:
        print(rec.helper_pids[0] if rec.helper_pids else -1, flush=True)  # the writer process
        model.generate(prompt_ids(), max_new_tokens=100000, min_new_tokens=100000, do_sample=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _wait_for_the_writer_process(pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            pytest.fail("the writer process did not exit after the recording process was killed")
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_mid_generation_leaves_a_valid_trace(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    script = CHILD.format(helpers=str(Path(__file__).parent), path=str(path), flush_every=FLUSH_EVERY)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        writer_pid = int(child.stdout.readline() or -1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if child.poll() is not None:
                pytest.fail(f"the recording process ended early: {child.stderr.read().decode()[-2000:]}")
            if len(list((path / "layers").glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no parts appeared within 120 s")
        assert writer_pid > 0 and _alive(writer_pid), "the recording should write through its writer process"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    _wait_for_the_writer_process(writer_pid)  # it writes what it was handed, then exits
    assert kvscope_main(["inspect", str(path)]) == 0
    trace = open_trace(path)
    steps = trace.read("steps", ["step"])["step"].to_pylist()
    assert len(steps) >= 3 * FLUSH_EVERY
    assert sorted(steps) == list(range(len(steps)))  # a prefix of the generation, no holes
    assert trace.num_rows("layers") == 2 * len(steps)
    assert trace.num_rows("generations") == 0  # killed before generate returned
