"""The recorder's C++ fast path: the same facts and rows as the Python path, and clear failures.

The extension is compiled once per test session, or once per `make test` (its environments share
a cache: $KVSCOPE_TEST_NATIVE_CACHE); a C++ compiler and ninja are on the CI machine; without them
these tests skip, and the Python path they are compared with is tested elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from recorder_helpers import (
    NEW_TOKENS,
    CacheOfLayers,
    assert_same_recording,
    dynamic_layer,
    prompt_ids,
    tiny_model,
    trace_rows,
)

import kvscope
from kvscope.errors import RecordingError, UsageError
from kvscope.recorder import native as native_fast_path
from kvscope.recorder.facts import SHAPE_END, fact_list
from kvscope.recorder.measure import FastStep, _python_facts, measure_cache
from kvscope.recorder.model_layout import ModelLayout
from kvscope.trace.reader import open_trace

cache_utils = pytest.importorskip("transformers.cache_utils")
DynamicLayer = getattr(cache_utils, "DynamicLayer", None)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> object:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if native_fast_path.find_ninja() is None:
        pytest.skip("no ninja")
    patch = pytest.MonkeyPatch()
    # `make test` gives every environment one cache (the build depends on torch and Python only,
    # the same in each): one compile instead of one per environment
    shared = os.environ.get("KVSCOPE_TEST_NATIVE_CACHE")
    patch.setenv("KVSCOPE_NATIVE_DIR", shared or str(tmp_path_factory.mktemp("native")))
    module = native_fast_path.build()
    yield module
    patch.undo()


class _Layer:
    def __init__(self, keys: object, values: object) -> None:
        self.keys, self.values = keys, values


def _layouts() -> list[list[_Layer]]:
    """Contiguous, fused-view, windowed, shared, K-only, empty, unfilled and 3-D layers."""
    fused = torch.randn(1, 3, 10, 2, 8)
    window = torch.randn(1, 2, 20, 8, dtype=torch.bfloat16)
    plain = (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    same = torch.randn(1, 2, 5, 4, dtype=torch.float16)
    return [
        [_Layer(*plain), _Layer(*plain)],
        [_Layer(fused[:, :, :7, 0], fused[:, :, :7, 1]), _Layer(same, same)],
        [_Layer(window[:, :, -7:], window[:, :, 3:9]), _Layer(torch.randn(2, 6, 8), torch.randn(2, 6, 8))],
        [_Layer(torch.ones(1, 2, 6, 8, dtype=torch.int8), None), _Layer(None, None), _Layer(*plain)],
        [_Layer(torch.empty(1, 2, 0, 8), torch.empty(1, 2, 0, 8)),
         _Layer(torch.randn(1, 2, 6, 8).transpose(1, 2)[:, :0], torch.randn(1, 2, 6, 8))],
        [_Layer(torch.randn(4, 6).t(), torch.randn(6, 4)), _Layer(torch.randn(1, 1, 9, 16)[..., ::2], plain[1])],
    ]


def test_capture_gives_the_python_records_for_every_layout(native: object) -> None:
    for number, layers in enumerate(_layouts()):
        captured = native.capture(layers)
        assert isinstance(captured, bytes), number
        assert fact_list(captured) == [int(x) for x in _python_facts(layers)], number


def test_a_record_is_what_the_format_says(native: object) -> None:
    keys, values = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)[..., ::2]
    records = fact_list(native.capture([_Layer(keys, values)]))
    end = values.data_ptr() + ((1 - 1) * 96 + (2 - 1) * 48 + (6 - 1) * 8 + (4 - 1) * 2 + 1) * 4
    assert records == [0, keys.data_ptr(), 1, values.data_ptr(), end, 1, 2, 6, 8, SHAPE_END, 1, 2, 6, 4, SHAPE_END]


def test_anything_unusual_is_left_to_the_python_path(native: object) -> None:
    class Marked(torch.Tensor):
        pass

    subclass = torch.randn(1, 2, 3, 4).as_subclass(Marked)
    assert native.capture([_Layer(subclass, torch.randn(1, 2, 3, 4))]) is None
    assert native.capture([_Layer(torch.randn(1, 2, 3, 4), "not a tensor")]) is None
    meta = native.capture([_Layer(torch.randn(1, 2, 3, 4, device="meta"), torch.randn(1, 2, 3, 4))])
    assert meta is None or fact_list(meta)[5:10] == [1, 2, 3, 4, SHAPE_END]  # no data: either, never a crash
    assert native.capture([object()]) is None  # no keys attribute
    with pytest.raises(TypeError):
        native.capture((_Layer(None, None),))


@pytest.mark.skipif(DynamicLayer is None, reason="this transformers release has no cache layer classes")
def test_measure_cache_with_the_native_path_matches_python_and_falls_back(native: object) -> None:
    class Marked(torch.Tensor):
        pass

    layout = ModelLayout("test", 2, ("full_attention",) * 2, None, None, "eager", "float32", "cpu", ())
    fused = torch.randn(1, 2, 6, 2, 8)
    cache = CacheOfLayers([dynamic_layer(fused[..., 0, :], fused[..., 1, :]),
                           dynamic_layer(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))])
    fast, slow = measure_cache(cache, layout, 6, native=native), measure_cache(cache, layout, 6)
    assert isinstance(fast, FastStep) and isinstance(fast.facts, bytes) and isinstance(slow.facts, list)
    assert fast.decoded() == slow.decoded() and fast.kv_bytes == slow.kv_bytes
    cache.layers[1].keys = cache.layers[1].keys.as_subclass(Marked)
    fallback = measure_cache(cache, layout, 6, native=native)
    assert isinstance(fallback.facts, list) and fallback.decoded() == slow.decoded()


class _CountingNative:
    """The native module, counting the capture calls and the steps they read."""

    def __init__(self, module: object) -> None:
        self.module, self.calls, self.read = module, 0, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.module, name)

    def capture(self, layers: list) -> object:
        self.calls += 1
        got = self.module.capture(layers)
        self.read += got is not None
        return got


@pytest.mark.skipif(DynamicLayer is None, reason="this transformers release has no cache layer classes")
@pytest.mark.parametrize("sample_kv_every", [0, 3])
def test_every_step_is_captured_natively(native: object, tmp_path: Path, sample_kv_every: int) -> None:
    model = tiny_model("gpt_neox")
    recorded = {}
    for name, mode in (("native", True), ("python", False)):
        with kvscope.record(model, tmp_path / name, native=mode, sample_kv_every=sample_kv_every) as rec:
            counting = rec.steps.native = _CountingNative(rec.steps.native) if mode else None
            out = model.generate(prompt_ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            del out
            rec.settle()
            recorded[name] = counting
    assert recorded["native"].calls == recorded["native"].read == NEW_TOKENS  # sampled steps too
    layers = assert_same_recording(tmp_path / "native", tmp_path / "python")
    assert len(layers) == NEW_TOKENS * model.config.num_hidden_layers
    if sample_kv_every:
        samples = {name: trace_rows(tmp_path / name, "kv_samples", ["step", "layer", "tensor"])
                   for name in ("native", "python")}
        assert samples["native"] == samples["python"] and len(samples["native"]) == len(range(0, NEW_TOKENS, 3)) * 2 * 2


def _record(model: torch.nn.Module, path: Path, native_mode: object, **generate: object) -> None:
    with kvscope.record(model, path, native=native_mode) as rec:
        for new_tokens in (NEW_TOKENS, 3):
            out = model.generate(prompt_ids(), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, **generate)
            del out
            rec.settle()


@pytest.mark.parametrize(("family", "implementation"),
                         [("gpt_neox", None), ("gemma3_text", None), ("llama", "static")])
def test_recordings_with_and_without_the_native_path_are_the_same(native: object, tmp_path: Path, family: str,
                                                                  implementation: str | None) -> None:
    model = tiny_model(family)
    extra = {"cache_implementation": implementation} if implementation else {}
    _record(model, tmp_path / "native", True, **extra)
    _record(model, tmp_path / "python", False, **extra)
    layers = assert_same_recording(tmp_path / "native", tmp_path / "python")
    assert len(layers) == (NEW_TOKENS + 3) * model.config.num_hidden_layers
    options = {name: json.loads(open_trace(tmp_path / name).read("run").to_pylist()[0]["options"])
               for name in ("native", "python")}
    assert options["native"]["native"] is True and options["python"]["native"] is False


def test_auto_on_cpu_uses_python_and_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSCOPE_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_fast_path, "_loaded", {})
    assert native_fast_path.resolve("auto", on_cuda=False)[0] is None
    assert native_fast_path.resolve(False, on_cuda=True)[0] is None
    assert not (tmp_path / "cache").exists()
    with kvscope.record(tiny_model("gpt_neox"), tmp_path / "t"):
        pass
    options = json.loads(open_trace(tmp_path / "t").read("run").to_pylist()[0]["options"])
    assert options["native"] is False


def test_native_true_fails_clearly_when_it_cannot_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSCOPE_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native_fast_path, "_loaded", {})
    with pytest.raises(RecordingError, match="native fast path could not be built"):
        kvscope.record(tiny_model("gpt_neox"), tmp_path / "t", native=True).start()


def test_the_native_option_is_validated(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="native"):
        kvscope.record(tiny_model("gpt_neox"), tmp_path / "t", native="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_allocator_counters_are_the_stats_call_s(native: object) -> None:
    from kvscope.recorder.allocator import AllocatorProbe

    held = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    python, fast = AllocatorProbe((0,)), AllocatorProbe((0,), native)
    assert fast._native_read is not None
    raw = native.allocator_stats(0)
    assert raw is not None, "this torch has no device-allocator API: the native reader never applies"
    assert fast.read() == python.read() == raw
    assert raw[0] >= held.numel()
    del held


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recordings_with_and_without_the_native_path_agree(native: object, tmp_path: Path) -> None:
    model = tiny_model("gpt_neox").cuda()
    for name, mode in (("native", True), ("python", False)):
        with kvscope.record(model, tmp_path / name, native=mode) as rec:
            out = model.generate(prompt_ids().cuda(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            del out
            rec.settle()
    traces = {name: open_trace(tmp_path / name) for name in ("native", "python")}
    steps = {name: trace.read("steps").to_pydict() for name, trace in traces.items()}
    for column in ("allocated_bytes", "reserved_bytes", "active_bytes", "alloc_retries", "num_ooms"):
        assert all(v is not None for v in steps["native"][column]), column
    assert steps["native"]["kv_bytes"] == steps["python"]["kv_bytes"]
    assert trace_rows(tmp_path / "native", "layers", ["gen_id", "step", "layer"]) == \
        trace_rows(tmp_path / "python", "layers", ["gen_id", "step", "layer"])
    options = json.loads(traces["native"].read("run").to_pylist()[0]["options"])
    assert options["native"] is True


def test_record_cli_native_on_and_off(native: object, tmp_path: Path) -> None:
    from kvscope.cli.main import main as kvscope_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "text": "hello"}\n')
    for mode, used in (("on", True), ("off", False)):
        code = kvscope_main(["record", "--twin", "pythia-1.4b", "--shrink", "--prompts", str(prompts),
                             "--max-new-tokens", "3", "--device", "cpu", "--native", mode, "-o", str(tmp_path / mode)])
        assert code == 0
        assert json.loads(open_trace(tmp_path / mode).read("run").to_pylist()[0]["options"])["native"] is used
    assert trace_rows(tmp_path / "on", "layers", ["gen_id", "step", "layer"]) == \
        trace_rows(tmp_path / "off", "layers", ["gen_id", "step", "layer"])


@pytest.mark.any_transformers  # the build cache and its hint: the same on every release
def test_auto_on_cuda_uses_a_cached_build_and_never_compiles(native: object, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    built = native_fast_path.build_directory()  # the module's build: its objects and ninja files
    monkeypatch.setenv("KVSCOPE_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_fast_path, "_loaded", {})
    module, why = native_fast_path.resolve("auto", on_cuda=True)  # nothing cached: Python, and it says so
    assert module is None and "python -m kvscope.recorder.native" in why
    assert not (tmp_path / "cache").exists()  # nothing was built or started
    shutil.copytree(built, native_fast_path.build_directory(), ignore=shutil.ignore_patterns("*.so"))
    path_before = os.environ.get("PATH")
    native_fast_path.build()  # what `python -m kvscope.recorder.native` does, in a process of its own (links
    # the copied objects: the fixture compiled them)
    assert os.environ.get("PATH") == path_before  # the recording process's PATH is never rewritten
    module, why = native_fast_path.resolve("auto", on_cuda=True)  # the next recording uses the cached build
    assert module is not None and why == "cached build" and module.capture([_Layer(None, None)]) == b""


@pytest.mark.any_transformers  # the build cache and its hint: the same on every release
def test_a_broken_cached_build_and_a_stale_lock_are_replaced(native: object, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    built = native_fast_path.build_directory()  # the module's build: its objects and ninja files
    monkeypatch.setenv("KVSCOPE_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_fast_path, "_loaded", {})
    directory = native_fast_path.build_directory()
    shutil.copytree(built, directory)  # so the rebuild below links again instead of compiling again
    broken = directory / f"{native_fast_path.module_name()}.so"
    broken.write_bytes(b"not a shared library")
    assert native_fast_path.load_built() is None and not broken.exists()  # auto: Python now, rebuilt later
    broken.write_bytes(b"not a shared library")
    lock = directory / "lock"  # what a build killed mid-way leaves: torch's builder would wait forever
    lock.write_text("")
    os.utime(lock, (0, 0))
    module = native_fast_path.build()
    assert module.capture([_Layer(None, None)]) == b"" and not lock.exists()
    assert broken.read_bytes()[:4] == b"\x7fELF"  # built again (this process keeps the module it loaded)


@pytest.mark.any_transformers  # the build cache and its hint: the same on every release
def test_cuda_without_a_cached_build_hints_the_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from kvscope.recorder import session

    monkeypatch.setenv("KVSCOPE_NATIVE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_fast_path, "_loaded", {})
    monkeypatch.setattr(session, "_native_hint_given", False)
    model = tiny_model("gpt_neox")

    def hints() -> list[str]:
        return [r.getMessage() for r in caplog.records if "python -m kvscope.recorder.native" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="kvscope"):
        with kvscope.record(model, tmp_path / "cpu"):  # on the CPU the Python path is the plan: no hint
            pass
        assert hints() == []
        # what resolve() answers for a model on CUDA when no build is cached (this machine has no GPU)
        real = native_fast_path.resolve
        monkeypatch.setattr(native_fast_path, "resolve", lambda mode, on_cuda: real(mode, on_cuda=True))
        for name in ("a", "b"):
            with kvscope.record(model, tmp_path / name):
                pass
    assert hints() == ["kvscope: measuring each decode step in Python (about 1.2% of a step on an H200); "
                       "`python -m kvscope.recorder.native` builds the C++ fast path once (about 0.4%)."]
    options = json.loads(open_trace(tmp_path / "a").read("run").to_pylist()[0]["options"])
    assert options["native"] is False and options["native_build"].startswith(native_fast_path.NO_CACHED_BUILD)
    # `kvscope record` quiets the end-of-block line (it prints its own table), not the hint
    from kvscope.cli.main import main as cli

    caplog.clear()
    monkeypatch.setattr(session, "_native_hint_given", False)
    with caplog.at_level(logging.INFO, logger="kvscope"):
        assert cli(["record", "--twin", "pythia-1.4b", "--shrink", "--limit", "1", "--max-new-tokens", "2",
                    "--device", "cpu", "-o", str(tmp_path / "cli")]) == 0
    assert len(hints()) == 1
