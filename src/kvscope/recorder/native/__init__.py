"""The recorder's optional C++ fast path (`kvscope_native.cpp`): per-step cache facts and allocator
counters in one C call each, instead of ~150 small C calls and a ~300-object stats dict.

It is compiled only when asked (`python -m kvscope.recorder.native`, or `native=True`), in a
process of its own, once per (source, torch, Python) triple, with torch's extension builder (a C++
compiler and ninja are needed), and cached under ``$KVSCOPE_NATIVE_DIR`` or
``~/.cache/kvscope/native``. `native="auto"` loads a cached build (milliseconds) or measures in
Python, and the run's options say which: the trace is the same either way (tested).
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
    beside = Path(sysconfig.get_path("scripts")) / "ninja"
    return shutil.which("ninja") or (str(beside) if beside.is_file() else None)


NO_CACHED_BUILD = "python (no cached build: python -m kvscope.recorder.native builds it)"  # "auto" found none
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


def _compile(verbose: bool) -> ModuleType:
    """Compile and import the extension in this process (the builder's own: see `build`)."""
    name = module_name()
    ninja = find_ninja()
    if ninja is None:
        raise RecordingError("the recorder's native fast path needs ninja to build (pip install ninja, or kvscope[record])")
    # torch's builder runs `ninja` from PATH; this is the build process's own environment.
    os.environ["PATH"] = os.pathsep.join([str(Path(ninja).parent), os.environ.get("PATH", "")])
    from torch.utils import cpp_extension

    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(directory),
                              extra_cflags=["-O2"], is_python_module=True, verbose=verbose)


def build() -> ModuleType:
    """Compile (or reuse) the extension in a child process and import it here; RecordingError with
    the compiler's output if it cannot."""
    name = module_name()
    with _lock:
        module = _cached(name)
        if module is not None:
            return module
        from kvscope.recorder.writer_process import child_pythonpath

        env = dict(os.environ, PYTHONPATH=child_pythonpath() or "")
        result = subprocess.run([sys.executable, "-m", "kvscope.recorder.native"], capture_output=True, text=True,
                                env=env, stdin=subprocess.DEVNULL)
        module = _cached(name) if result.returncode == 0 else None
        if module is None:
            output = (result.stderr or result.stdout).strip()[-3000:]
            raise RecordingError(f"the recorder's native fast path could not be built: {output}".strip())
        return module


def load_built() -> ModuleType | None:
    """The extension if a build of it is cached already; None otherwise (nothing is compiled)."""
    with _lock:
        return _cached(module_name())


def resolve(mode: str | bool, on_cuda: bool) -> tuple[ModuleType | None, str]:
    """The extension to record with under the `native` option (None: the Python path), and which.

    True: build now (or reuse a cached build) or raise. False: never. "auto": on CUDA, a cached
    build, else Python; on CPU (where the hook's cost does not matter) Python. Never compiles for "auto".
    """
    if mode is False:
        return None, "off"
    if mode is True:
        return build(), "built or cached, on request"
    if mode != "auto":
        raise RecordingError(f"native must be 'auto', True or False, not {mode!r}")
    if os.environ.get("KVSCOPE_NATIVE") == "0":
        return None, "python (KVSCOPE_NATIVE=0)"
    if not on_cuda:
        return None, "python (CPU)"
    module = load_built()
    if module is None:
        return None, NO_CACHED_BUILD
    return module, "cached build"


def main() -> int:
    """`python -m kvscope.recorder.native`: build (verbosely) and report where."""
    try:
        _compile(verbose=True)
    except Exception as exc:  # noqa: BLE001 - compiler missing, build or import error: the message is the report
        print(exc, file=sys.stderr)
        return 1
    print(f"built {module_name()} in {build_directory()}")
    return 0
