"""The writer process: same rows as the writer thread, errors reported at the next wait, never in the hook."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from recorder_helpers import NEW_TOKENS, assert_same_recording, prompt_ids, tiny_model

import kvscope
from kvscope.errors import RecordingError, UsageError
from kvscope.recorder.batch_writer import Rows, Steps
from kvscope.recorder.writer_process import WriterProcess
from kvscope.trace.reader import open_trace

EVENT_FIELDS = ("run_id", "gen_id", "step", "t_ns", "kind", "detail")


def _record(model: torch.nn.Module, path: Path, writer: str) -> None:
    with kvscope.record(model, path, writer=writer) as rec:
        for new_tokens in (NEW_TOKENS, 3):
            out = model.generate(prompt_ids(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            del out
            rec.settle()


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text"])
def test_process_and_thread_writers_write_the_same_rows(tmp_path: Path, family: str) -> None:
    model = tiny_model(family)
    _record(model, tmp_path / "process", "process")
    _record(model, tmp_path / "thread", "thread")
    layers = assert_same_recording(tmp_path / "process", tmp_path / "thread")
    assert len(layers) == (NEW_TOKENS + 3) * model.config.num_hidden_layers
    runs = {name: json.loads(open_trace(tmp_path / name).read("run").to_pylist()[0]["options"])
            for name in ("process", "thread")}
    assert runs["process"]["writer"] == "process" and runs["thread"]["writer"] == "thread"


def test_a_failed_write_is_raised_at_the_next_wait_and_later_writes_still_land(tmp_path: Path) -> None:
    writer = WriterProcess(tmp_path / "t")
    writer.send(Rows("no_such_table", ("a",), [(1,)]))
    with pytest.raises(RecordingError, match="no_such_table"):
        writer.flush(wait=True)
    writer.send(Rows("events", EVENT_FIELDS, [("r", 0, 1, 5, "marker", "{}")]))
    writer.flush(wait=True)
    writer.close()
    events = pq.read_table(tmp_path / "t" / "events").to_pylist()  # no run row: read the part itself
    assert [(e["kind"], e["step"]) for e in events] == [("marker", 1)]


def test_a_killed_writer_process_is_reported_at_the_next_wait_never_on_hand_over(tmp_path: Path) -> None:
    writer = WriterProcess(tmp_path / "t")
    os.kill(writer.pids[0], signal.SIGKILL)
    writer.helper.process.wait()
    for step in range(3):  # what the hook calls: no exception, whatever the writer's state
        writer.send(Steps([], [("r", 0, step, 1, None)]))
        writer.flush()
    with pytest.raises(RecordingError, match="writer process"):
        writer.flush(wait=True)
    writer.close()  # already reported: closing does not raise again


def test_the_writer_option_is_validated(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="writer"):
        kvscope.record(tiny_model("gpt_neox"), tmp_path / "t", writer="fast")


def test_a_recording_that_fails_to_start_leaves_no_writer_process(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvscope.recorder import session

    started: list[WriterProcess] = []

    class Tracked(WriterProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    def broken_metadata(*args: object, **kwargs: object) -> None:
        raise RuntimeError("metadata failed")

    monkeypatch.setattr(session, "WriterProcess", Tracked)
    monkeypatch.setattr(session, "run_metadata", broken_metadata)
    model = tiny_model("gpt_neox")
    with pytest.raises(RuntimeError, match="metadata failed"):
        with kvscope.record(model, tmp_path / "t"):
            pass
    assert len(started) == 1 and started[0].helper.process.poll() is not None  # exited, not left running
    assert "generate" not in vars(model)


def test_the_writer_child_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; import kvscope.recorder.writer_child, kvscope.recorder.nvml; "
            "print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(kvscope.__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


def test_no_message_a_recording_sends_makes_the_writer_import_torch(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpickling a message imports the module of every class it holds: one torch object (the run
    row's `torch.__version__` is a TorchVersion) made the child import torch, which took about
    2.5 s of a process's first block on the H200 host."""
    import io
    import pickle

    from kvscope.recorder import writer_process

    foreign: set[tuple[str, str, str]] = set()

    class Checking(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if module.split(".")[0] in ("torch", "transformers"):
                foreign.add((self.message, module, name))
            return super().find_class(module, name)

    original = writer_process.ChildProcess.send

    def send(self: writer_process.ChildProcess, message: object) -> None:
        unpickler = Checking(io.BytesIO(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
        unpickler.message = type(message).__name__
        unpickler.load()
        original(self, message)

    monkeypatch.setattr(writer_process.ChildProcess, "send", send)
    _record(tiny_model("gpt_neox"), tmp_path / "t", "process")
    assert open_trace(tmp_path / "t").num_rows("steps") == NEW_TOKENS + 3
    assert not foreign, foreign

def test_without_a_writer_process_auto_falls_back_to_a_thread_and_process_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kvscope.recorder import writer_process

    monkeypatch.setattr(writer_process, "_idle", [])  # no writer process left by an earlier block to reuse
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    model = tiny_model("gpt_neox")
    with pytest.warns(RuntimeWarning, match="thread instead of a process"):
        with kvscope.record(model, tmp_path / "auto"):
            model.generate(prompt_ids(), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    trace = open_trace(tmp_path / "auto")
    assert json.loads(trace.read("run").to_pylist()[0]["options"])["writer"] == "thread"
    assert trace.num_rows("steps") == 3
    with pytest.raises(RecordingError, match="writer process did not start"):
        kvscope.record(model, tmp_path / "process", writer="process").start()
    assert "generate" not in vars(model)


def test_a_writer_process_that_died_unnoticed_is_reported_at_close(tmp_path: Path) -> None:
    writer = WriterProcess(tmp_path / "t")
    os.kill(writer.pids[0], signal.SIGKILL)
    writer.helper.process.wait()
    with pytest.raises(RecordingError, match="before the trace was closed"):
        writer.close()


def test_the_child_gets_kvscope_on_its_path_but_never_a_site_packages_directory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import site

    from kvscope.recorder.writer_process import child_pythonpath

    root = str(Path(kvscope.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setattr(site, "getsitepackages", lambda: ["/usr/lib/python3/site-packages"])
    assert child_pythonpath() == os.pathsep.join([root, "/somewhere/else"])
    monkeypatch.setattr(site, "getsitepackages", lambda: [root])  # an installed (non-editable) kvscope
    assert child_pythonpath() == "/somewhere/else"
