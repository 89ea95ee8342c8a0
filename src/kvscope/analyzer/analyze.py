"""Run detectors over loaded traces: the library side of `kvscope analyze`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kvscope.analyzer.findings import Finding, sort_findings
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.registry import Detector, select


def analyze(tables: LoadedTraces, detectors: Iterable[str | Detector] | None = None,
            configs: Mapping[str, Any] | None = None) -> list[Finding]:
    """Findings of the given detectors (all when None), most severe first."""
    given = list(detectors or [])
    chosen = [d for d in given if isinstance(d, Detector)]
    names = [d for d in given if isinstance(d, str)]
    if names or not given:
        chosen += select(names)
    configs = configs or {}
    findings: list[Finding] = []
    for detector in chosen:
        findings.extend(detector.run(tables, configs.get(detector.name)))
    return sort_findings(findings)
