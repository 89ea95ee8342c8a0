"""The recorder's optional C++ fast path (`kvscope_native.cpp`): per-step cache facts and allocator
counters in one C call each, instead of ~150 small C calls and a ~300-object stats dict.

It is compiled on the machine that records, once per (source, torch, Python) triple, with torch's
extension builder (a C++ compiler and ninja are needed), and cached under
``$KVSCOPE_NATIVE_DIR`` or ``~/.cache/kvscope/native``. Loading a cached build takes milliseconds;
a build takes tens of seconds (measured in docs/benchmarks.md). Where it cannot be built the
recorder measures the same facts in Python: the trace is the same either way (tested).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

from kvscope.errors import RecordingError

SOURCE = Path(__file__).with_name("kvscope_native.cpp")
_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_background: dict[str, subprocess.Popen] = {}


def module_name() -> str:
    """A name unique to this source, torch and Python: a cached build is never reused across them."""
    import torch

    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    digest.update(str(sysconfig.get_config_var("SOABI")).encode())
    return f"kvscope_native_{digest.hexdigest()[:16]}"


def build_directory(name: str | None = None) -> Path:
    base = os.environ.get("KVSCOPE_NATIVE_DIR") or Path.home() / ".cache" / "kvscope" / "native"
    return Path(base) / (name or module_name())


def _built_library(name: str) -> Path | None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for candidate in (build_directory(name) / f"{name}.so", build_directory(name) / f"{name}{suffix}"):
        if candidate.is_file():
            return candidate
    return None


def _import(name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401 - the extension links against torch's libraries, loaded by this import

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RecordingError(f"cannot import the native fast path from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_ninja() -> str | None:
    """ninja on PATH, or the one pip put beside this interpreter (a venv's bin is often not on PATH)."""
    found = shutil.which("ninja")
    if found is None:
        beside = Path(sysconfig.get_path("scripts")) / "ninja"
        if beside.is_file():
            os.environ["PATH"] = os.pathsep.join([str(beside.parent), os.environ.get("PATH", "")])
            found = str(beside)
    return found


STALE_LOCK_S = 600  # a build takes ~15 s: a lock this old was left by a build that was killed


def _remove_stale_lock(directory: Path) -> None:
    """torch's builder waits for as long as its lock file exists; one left by a killed build would
    make every later build wait forever."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _cached(name: str) -> ModuleType | None:
    """The module loaded already or built already (call under `_lock`); None if neither. A cached
    build that does not import (e.g. a link cut short) is removed, so the next build makes it again."""
    if name in _loaded:
        return _loaded[name]
    library = _built_library(name)
    if library is None:
        return None
    try:
        module = _import(name, library)
    except Exception:  # noqa: BLE001 - any import failure means a broken build
        library.unlink(missing_ok=True)
        return None
    _loaded[name] = module
    return module


def build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse) the extension and import it; RecordingError with the cause if it cannot."""
    name = module_name()
    with _lock:
        module = _cached(name)
        if module is not None:
            return module
        try:
            from torch.utils import cpp_extension

            if find_ninja() is None:
                raise RecordingError("the recorder's native fast path needs ninja to build "
                                     "(pip install ninja, or kvscope[record])")
            directory = build_directory(name)
            directory.mkdir(parents=True, exist_ok=True)
            _remove_stale_lock(directory)
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(directory),
                                        extra_cflags=["-O2"], is_python_module=True, verbose=verbose)
        except RecordingError:
            raise
        except Exception as exc:  # noqa: BLE001 - compiler missing, build or import error
            raise RecordingError(f"the recorder's native fast path could not be built: {exc}".strip()) from exc
        _loaded[name] = module
        return module


def load_built() -> ModuleType | None:
    """The extension if a build of it is cached already; None otherwise (nothing is compiled)."""
    with _lock:
        return _cached(module_name())


def build_in_background() -> subprocess.Popen | None:
    """Start one detached build for later recordings (the current one measures in Python)."""
    name = module_name()
    with _lock:
        running = _background.get(name)
        if running is not None and running.poll() is None:
            return running
        directory = build_directory(name)
        directory.mkdir(parents=True, exist_ok=True)
        from kvscope.recorder.writer_process import child_pythonpath

        env = dict(os.environ)
        pythonpath = child_pythonpath()  # this kvscope first, as for the writer process
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        with open(directory / "build.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "kvscope.recorder.native"], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)
        _background[name] = process
        return process


def resolve(mode: str | bool, on_cuda: bool) -> ModuleType | None:
    """The extension to record with under the `native` option, or None for the Python path.

    True: build now or raise. False: never. "auto": on CUDA, a cached build, else start a
    background build for later recordings; on CPU (where the hook's cost does not matter) none.
    """
    if mode is False:
        return None
    if mode is True:
        return build()
    if mode != "auto":
        raise RecordingError(f"native must be 'auto', True or False, not {mode!r}")
    if not on_cuda or os.environ.get("KVSCOPE_NATIVE") == "0":
        return None
    module = load_built()
    if module is None:
        try:
            build_in_background()
        except OSError:
            pass
    return module


def main() -> int:
    """`python -m kvscope.recorder.native`: build (verbosely) and report where."""
    try:
        build(verbose=True)
    except RecordingError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"built {module_name()} in {build_directory()}")
    return 0
