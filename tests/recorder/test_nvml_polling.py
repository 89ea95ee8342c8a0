"""The NVML polling process: readings matched to steps by time, generation peaks, clean exits.

Runs on machines without a GPU through the child's "fake" device (a counter instead of NVML);
on the GPU host the same code reads NVML (tests/recorder/test_recorder_gpu.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from recorder_helpers import tiny_model

import kvscope
from kvscope.errors import RecordingError, UsageError
from kvscope.recorder.nvml_poller import NvmlPoller


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_each_step_gets_the_first_reading_at_or_after_it_and_peaks_cover_the_generation() -> None:
    origin = time.perf_counter_ns()
    poller = NvmlPoller(["fake"], origin, interval_s=0.001)
    try:
        poller.begin(0)
        times = []
        for _ in range(30):
            time.sleep(0.01)
            times.append(time.perf_counter_ns() - origin)
        keys = [(0, step) for step in range(30)]
        values = poller.take(keys, times)
        assert None not in values
        # 10 ms apart, polled every 1 ms: steps get later readings in order. Two steps may share one
        # reading only if the poller was starved for a whole step (a loaded CI machine), so most differ.
        assert values == sorted(values) and len(set(values)) >= 25
        peak = poller.peak(0)
        assert peak is not None and peak >= values[-1]
        assert poller.latest is not None and poller.latest >= peak
        assert poller.peak(1) is None  # a generation that never began has no peak
        later = poller.take([(0, 30)], [time.perf_counter_ns() - origin])
        assert later[0] is not None and later[0] > values[-1]
    finally:
        poller.close()
    assert poller._process.poll() is not None  # the polling process has exited


def test_a_failing_child_is_a_recording_error() -> None:
    with pytest.raises(RecordingError, match="did not start"):
        NvmlPoller(["GPU-00000000-0000-0000-0000-000000000000"], time.perf_counter_ns(), start_timeout_s=20)


def test_the_polling_process_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, time
        from kvscope.recorder.nvml_poller import NvmlPoller
        poller = NvmlPoller(["fake"], time.perf_counter_ns())
        print(poller._process.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


class _FakeProbe:
    """NVML on a machine without it: the polling process reads its counter ("fake" device)."""

    enabled = True
    total = 80 * 2**30
    driver_version = "fake"

    def __init__(self, devices: tuple[int, ...], mode: str | bool = "auto") -> None:
        pass

    def device_ids(self) -> list[str]:
        return ["fake"]

    def used(self) -> int:
        return 1_000_000


def test_a_recording_gets_a_polled_reading_in_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from recorder_helpers import NEW_TOKENS, prompt_ids, tiny_model

    import kvscope
    from kvscope.recorder import session
    from kvscope.trace.reader import open_trace

    monkeypatch.setattr(session, "NvmlProbe", _FakeProbe)
    model = tiny_model("gpt_neox")
    with kvscope.record(model, tmp_path / "t") as rec:
        for _ in range(2):
            out = model.generate(prompt_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            del out
            rec.settle()
    trace = open_trace(tmp_path / "t")
    steps = trace.read("steps").sort_by([("gen_id", "ascending"), ("step", "ascending")]).to_pydict()
    used = steps["nvml_used_bytes"]
    assert len(used) == 2 * NEW_TOKENS and None not in used
    assert used == sorted(used) and all(v > 1_000_000 for v in used)  # the counter: later steps, later reads
    generations = trace.read("generations").sort_by("gen_id").to_pylist()
    for gen in generations:
        own = [v for g, v in zip(steps["gen_id"], used, strict=True) if g == gen["gen_id"]]
        assert gen["peak_nvml_used_bytes"] >= max(own)
    assert generations[0]["peak_nvml_used_bytes"] < min(v for g, v in zip(steps["gen_id"], used, strict=True) if g == 1)
    options = json.loads(trace.read("run").to_pylist()[0]["options"])
    assert options["nvml_sampling"].startswith("process")
    assert options["writer"] == "process"  # the writer process matched the readings from the shared ring


def test_steps_after_the_process_stopped_get_no_reading() -> None:
    origin = time.perf_counter_ns()
    poller = NvmlPoller(["fake"], origin)
    early = time.perf_counter_ns() - origin
    time.sleep(0.01)
    poller._stop_process()  # the polling process is gone (killed, crashed)
    late = time.perf_counter_ns() - origin + 10**9
    values = poller.take([(0, 0), (0, 1)], [early, late])
    assert values[0] is not None and values[1] is None  # null, never a stale reading
    poller.close()
    assert poller.take([(0, 2)], [late]) == [None]  # a closed poller answers, without readings


def test_the_polling_interval_is_an_option_and_is_recorded(tmp_path: Path) -> None:
    poller = NvmlPoller(["fake"], time.perf_counter_ns(), interval_s=0.005)
    try:
        assert poller.description == "process, polled every 5 ms"
    finally:
        poller.close()
    with pytest.raises(UsageError, match="nvml_interval_ms"):
        kvscope.record(tiny_model("gpt_neox"), tmp_path / "t", nvml_interval_ms=0)
