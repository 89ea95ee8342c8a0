"""The detector registry: built-in modules and the `kvscope.detectors` entry-point group.

A detector is one module that defines ``DETECTOR = Detector(name, Config, summary=...,
measure=measure, judge=judge)``: ``Config`` is a frozen dataclass of thresholds,
``measure(engine)`` runs the detector's SQL (no threshold in it) and returns the measured rows,
and ``judge(measured, config)`` is a pure Python function of those rows and the config returning
findings. Measuring once and judging many times is what ``kvscope tune`` does; the SQL half runs
on any engine (``kvscope.analyzer.engine``). A detector may instead give one
``detect(tables, config)`` function (``Detector(name, Config, detect, summary)``): it runs on
DuckDB only and is re-run whole for every value tune tries. Every module in ``kvscope.analyzer.detectors`` is registered by being there;
a user package registers its own by naming the module (or the Detector object) in its
``[project.entry-points."kvscope.detectors"]`` table.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from kvscope.analyzer.findings import Finding
from kvscope.errors import UsageError

ENTRY_POINT_GROUP = "kvscope.detectors"
BUILTIN_PACKAGE = "kvscope.analyzer.detectors"


@dataclass(frozen=True)
class Detector:
    """A named detector: its config class (frozen dataclass of thresholds) and its two halves.

    `measure(engine)` returns measured rows (any value: typically a frozen dataclass of row lists),
    `judge(measured, config)` the findings. A detector with only `detect(tables, config)` is
    measured by keeping the tables and judged by running `detect`.
    """

    name: str
    config: type
    detect: Callable[[Any, Any], list[Finding]] | None = None
    summary: str = ""
    measure: Callable[[Any], Any] | None = None
    judge: Callable[[Any, Any], list[Finding]] | None = None

    def __post_init__(self) -> None:
        if (self.measure is None) != (self.judge is None) or (self.detect is None and self.measure is None):
            raise TypeError(f"detector {self.name!r}: give measure and judge, or detect.")

    @property
    def split(self) -> bool:
        """Whether the detector has a threshold-free measure half (re-judged without re-measuring)."""
        return self.measure is not None

    def default_config(self) -> Any:
        return self.config()

    def measured(self, tables: Any) -> Any:
        """The detector's measured rows (a one-function detector: the tables themselves)."""
        return self.measure(tables) if self.measure is not None else tables

    def judged(self, measured: Any, config: Any | None = None) -> list[Finding]:
        """Findings from measured rows and a config (defaults when None)."""
        cfg = config if config is not None else self.config()
        if self.judge is not None:
            return list(self.judge(measured, cfg))
        assert self.detect is not None
        return list(self.detect(measured, cfg))

    def run(self, tables: Any, config: Any | None = None) -> list[Finding]:
        return self.judged(self.measured(tables), config)


def _as_detector(obj: Any, origin: str) -> Detector:
    if isinstance(obj, types.ModuleType):
        obj = getattr(obj, "DETECTOR", None)
    if not isinstance(obj, Detector):
        raise UsageError(f"{origin} does not provide a kvscope Detector (a module with DETECTOR = Detector(...)).")
    return obj


def _builtin() -> dict[str, Detector]:
    package = importlib.import_module(BUILTIN_PACKAGE)
    found: dict[str, Detector] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        if hasattr(module, "DETECTOR"):
            det = _as_detector(module, f"module {module.__name__}")
            found[det.name] = det
    return found


_REGISTRY: dict[str, Detector] | None = None
# Entry points that failed to load, by name: reported when asked for, never breaking the others.
_BROKEN: dict[str, str] = {}


def registry() -> dict[str, Detector]:
    """Every known detector by name: built-ins first, then those of installed packages."""
    global _REGISTRY
    if _REGISTRY is None:
        found = _builtin()
        _BROKEN.clear()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            origin = f"entry point {ep.name!r} ({ep.value})"
            try:
                det = _as_detector(ep.load(), origin)
            except Exception as exc:  # a broken plugin must not break the built-in detectors
                _BROKEN[ep.name] = f"{origin} failed to load: {type(exc).__name__}: {exc}"
                continue
            found.setdefault(det.name, det)
        _REGISTRY = found
    return _REGISTRY


def register(detector: Detector) -> None:
    """Add (or replace) a detector at run time, e.g. from a test or a notebook."""
    registry()[detector.name] = detector


def known_names() -> list[str]:
    return sorted(registry())


def get_detector(name: str) -> Detector:
    try:
        return registry()[name]
    except KeyError:
        if name in _BROKEN:
            raise UsageError(f"detector {name!r} cannot be used: {_BROKEN[name]}.") from None
        raise UsageError(f"unknown detector {name!r}; known detectors: {', '.join(known_names())}.") from None


def select(names: Iterable[str] | None) -> list[Detector]:
    """The named detectors (all of them when `names` is empty), in a stable order."""
    wanted = list(names or [])
    if not wanted:
        return [registry()[n] for n in known_names()]
    return [get_detector(n) for n in dict.fromkeys(wanted)]


def _convert(raw: str, hint: Any, where: str) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null") and (hint is type(None) or type(None) in typing.get_args(hint)):
        return None
    candidates = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in candidates:
        try:
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if kind is int:
                return int(text)
            if kind is float:
                return float(text)
            if kind is str:
                return text
        except ValueError:
            continue
    raise UsageError(f"{where}: {raw!r} is not a valid value ({getattr(hint, '__name__', hint)}).")


def field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def with_value(config: Any, field_name: str, raw: str | float | int | bool | None, where: str = "") -> Any:
    """A copy of `config` with one field set; `raw` strings are converted to the field's type."""
    fields = field_types(type(config))
    if field_name not in fields:
        raise UsageError(f"{where or type(config).__name__}: no threshold {field_name!r}; "
                         f"fields are {', '.join(fields)}.")
    value = _convert(raw, fields[field_name], where or field_name) if isinstance(raw, str) else raw
    if isinstance(value, float) and fields[field_name] is int and value.is_integer():
        value = int(value)
    return dataclasses.replace(config, **{field_name: value})


def parse_overrides(items: Iterable[str], detectors: Iterable[Detector]) -> dict[str, Any]:
    """`detector.field=value` strings to one config per detector (defaults elsewhere)."""
    configs = {d.name: d.default_config() for d in detectors}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not field_name:
            raise UsageError(f"--set {item!r}: expected detector.field=value, e.g. growth_curve.gain_threshold=0.1.")
        if name not in configs:
            get_detector(name)  # unknown → UsageError listing the known ones
            raise UsageError(f"--set {item!r}: detector {name!r} is not among the selected detectors.")
        configs[name] = with_value(configs[name], field_name, raw, f"--set {key.strip()}")
    return configs
