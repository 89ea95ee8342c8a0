"""The Python analysis API: `kvscope.analyze(paths, detectors=..., config=...)`.

    import kvscope
    result = kvscope.analyze("traces/run1", config={"post_eos": {"live_threshold": 0.6}})
    result.verdict.worst.headline            # "healthy", or what needs action
    [f.message for f in result.at_least("warning")]

Plain dicts of thresholds are accepted (converted to each detector's frozen config, the same
fields as `kvscope analyze --set detector.field=value`); so are config objects themselves.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from kvscope.analyzer.analyze import analyze as _run_detectors
from kvscope.analyzer.engine import open_engine
from kvscope.analyzer.findings import SEVERITY_RANK, Finding
from kvscope.analyzer.load import load_traces
from kvscope.analyzer.registry import Detector, get_detector, select, with_value
from kvscope.analyzer.verdict import Verdict, verdict_of
from kvscope.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Analysis:
    """What `kvscope.analyze` returns: every finding (most severe first) and the verdict per run."""

    findings: list[Finding]
    verdict: Verdict

    def at_least(self, severity: str) -> list[Finding]:
        """The findings of this severity or worse ("info", "warning", "critical")."""
        if severity not in SEVERITY_RANK:
            raise UsageError(f"severity must be one of {', '.join(SEVERITY_RANK)}, not {severity!r}.")
        return [f for f in self.findings if f.at_least(severity)]

    @property
    def healthy(self) -> bool:
        """No warning or critical finding."""
        return not self.at_least("warning")

    def to_dict(self) -> dict[str, Any]:
        """The same object as `kvscope analyze --format json-verdict`."""
        return {"verdict": self.verdict.to_dict(), "findings": [f.to_dict() for f in self.findings]}


def build_configs(detectors: Sequence[Detector], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """One config per detector from `{"detector": {"field": value}}` (or config objects); defaults elsewhere."""
    configs = {d.name: d.default_config() for d in detectors}
    for name, given in (config or {}).items():
        if name not in configs:
            get_detector(name)  # an unknown name raises UsageError listing the known ones
            raise UsageError(f"config for {name!r}: that detector is not among the selected detectors.")
        if dataclasses.is_dataclass(given) and not isinstance(given, type):
            if type(given) is not type(configs[name]):
                raise UsageError(f"config for {name!r}: expected {type(configs[name]).__name__}, "
                                 f"not {type(given).__name__}.")
            configs[name] = given
            continue
        if not isinstance(given, Mapping):
            raise UsageError(f"config for {name!r}: expected a dict of thresholds, not {type(given).__name__}.")
        for field_name, value in given.items():
            configs[name] = with_value(configs[name], str(field_name), value, f"config {name}.{field_name}")
    return configs


def analyze(paths: PathLike | Sequence[PathLike], detectors: Iterable[str | Detector] | None = None,
            config: Mapping[str, Mapping[str, Any] | Any] | None = None, *,
            threads: int | None = None, engine: str = "duckdb", master: str | None = None) -> Analysis:
    """Run detectors over one trace, several, or folders of traces, and give the verdict per run.

    Args:
        paths: a trace directory, a folder of traces, or a list of them.
        detectors: detector names (or Detector objects); None runs every registered detector.
        config: thresholds per detector, e.g. ``{"post_eos": {"live_threshold": 0.6}}``; a value
            may also be the detector's config object.
        threads: DuckDB threads (default: all cores).
        engine: "duckdb" (default) or "spark": where the detectors' measure SQL runs (docs/fleet.md).
        master: the Spark master for engine="spark" (default local[*]; an active session is reused).

    Raises:
        kvscope.errors.UsageError: an unknown detector or threshold, or a value of the wrong type.
        kvscope.errors.TraceError: a path that is not a readable trace.
    """
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    wanted = list(detectors or [])
    if not all(isinstance(d, (str, Detector)) for d in wanted):
        raise UsageError("detectors must be names or Detector objects.")
    names = [d for d in wanted if isinstance(d, str)]
    chosen = [d for d in wanted if isinstance(d, Detector)] + (select(names) if names else [])
    if not wanted:
        chosen = select([])
    configs = build_configs(chosen, config)
    with open_engine(given, engine=engine, master=master, threads=threads) as tables:
        findings = _run_detectors(tables, chosen, configs)
        verdict = verdict_of(tables, findings)
    return Analysis(findings, verdict)


def sql(paths: PathLike | Sequence[PathLike], query: str, *, to: Literal["arrow", "polars"] = "arrow",
        threads: int | None = None) -> Any:
    """One DuckDB query over the traces' views (run, generations, steps, layers, events, kv_samples,
    head_stats), returned with its column names: a ``pyarrow.Table`` (default) or a ``polars.DataFrame``.

        kvscope.sql("traces/", "SELECT run_id, max(kv_bytes) AS peak FROM steps GROUP BY run_id")

    Raises:
        kvscope.errors.UsageError: a query DuckDB refuses, or an unknown ``to``.
    """
    import duckdb

    if to not in ("arrow", "polars"):
        raise UsageError(f"to must be 'arrow' or 'polars', not {to!r}.")
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    with load_traces(given, threads=threads) as tables:
        try:
            table = tables.arrow(query)
        except duckdb.Error as exc:
            raise UsageError(f"the query failed: {str(exc).splitlines()[0]}") from exc
    if to == "polars":
        import polars as pl

        return pl.from_arrow(table)
    return table
