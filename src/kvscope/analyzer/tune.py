"""Sweep one detector threshold over labelled traces: precision, recall and F1 per value.

Labels are a CSV file with a header and the columns
``run_id`` (required), ``gen_id`` (optional: empty or absent labels the whole run),
``expected`` (required: 1/0, true/false, yes/no, present/absent — whether the detector should
report a finding there) and ``detector`` (optional: rows naming another detector are skipped).
A label counts as predicted positive when the detector reports a finding at or above
``min_severity`` for that run (and, for a generation label, that generation or the whole run).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding
from kvscope.analyzer.registry import Detector, field_types, with_value
from kvscope.errors import UsageError

_TRUE = {"1", "true", "yes", "y", "present", "positive", "t"}
_FALSE = {"0", "false", "no", "n", "absent", "negative", "f"}


@dataclass(frozen=True)
class Label:
    run_id: str
    gen_id: int | None
    expected: bool


@dataclass(frozen=True)
class TuneRow:
    value: float
    tp: int
    fp: int
    fn: int
    tn: int
    best: bool = False

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn,
                "precision": self.precision, "recall": self.recall, "f1": self.f1, "best": self.best}


def read_labels(path: str | Path, detector: str) -> list[Label]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = set(reader.fieldnames or [])
            missing = {"run_id", "expected"} - fields
            if missing:
                raise UsageError(f"{path}: labels need the columns run_id and expected (optional gen_id, detector); "
                                 f"missing {', '.join(sorted(missing))}.")
            labels = []
            for number, row in enumerate(reader, start=2):
                if (row.get("detector") or "").strip() not in ("", detector):
                    continue
                flag = (row.get("expected") or "").strip().lower()
                if flag not in _TRUE | _FALSE:
                    raise UsageError(f"{path}:{number}: expected must be 1/0, true/false, yes/no or present/absent, "
                                     f"not {row.get('expected')!r}.")
                gen = (row.get("gen_id") or "").strip()
                try:
                    gen_id = int(gen) if gen else None
                except ValueError:
                    raise UsageError(f"{path}:{number}: gen_id must be an integer or empty, not {gen!r}.") from None
                labels.append(Label((row.get("run_id") or "").strip(), gen_id, flag in _TRUE))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the labels file ({exc.strerror}).") from exc
    if not labels:
        raise UsageError(f"{path}: no labels for detector {detector!r}.")
    return labels


def parse_range(text: str, kind: Any) -> list[float]:
    """`a:b:step` to the values a, a+step, ... up to b inclusive."""
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--range {text!r}: expected a:b:step, e.g. 0.05:0.3:0.05.") from None
    if step <= 0 or stop < start or not all(math.isfinite(x) for x in (start, stop, step)):
        raise UsageError(f"--range {text!r}: needs a <= b and a positive step.")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > 10_000:
        raise UsageError(f"--range {text!r}: {count} values; use a coarser step.")
    values = [round(start + i * step, 12) for i in range(count)]
    if kind is int:
        values = sorted({float(int(round(v))) for v in values})
    return values


def predicted(findings: list[Finding], label: Label, min_severity: str) -> bool:
    return any(f.run_id == label.run_id and f.at_least(min_severity)
               and (label.gen_id is None or f.gen_id is None or f.gen_id == label.gen_id) for f in findings)


def sweep(tables: Engine, detector: Detector, base_config: Any, param: str, values: list[float],
          labels: list[Label], min_severity: str = "warning",
          on_value: Callable[[float], None] | None = None) -> list[TuneRow]:
    """Measure the detector once, judge it at each value of `param` and score it against the labels.

    A detector with measure and judge halves runs its SQL once whatever the number of values; one
    with a single detect function (a plugin) is re-run for each value.
    """
    known = {row["run_id"] for row in tables.records("SELECT DISTINCT run_id FROM run")}
    unknown = sorted({lab.run_id for lab in labels} - known)
    if unknown:
        raise UsageError(f"labels name run(s) not in the traces: {', '.join(unknown[:5])}.")
    kind = field_types(type(base_config)).get(param)
    measured = detector.measured(tables)
    rows = []
    for value in values:
        config = with_value(base_config, param, int(value) if kind is int else value, f"--param {param}")
        findings = [f for f in detector.judged(measured, config) if f.detector == detector.name]
        tp = fp = fn = tn = 0
        for label in labels:
            hit = predicted(findings, label, min_severity)
            tp += hit and label.expected
            fp += hit and not label.expected
            fn += (not hit) and label.expected
            tn += (not hit) and not label.expected
        rows.append(TuneRow(value, tp, fp, fn, tn))
        if on_value is not None:
            on_value(value)
    if rows:
        best = max(range(len(rows)), key=lambda i: (rows[i].f1, -i))
        rows[best] = dataclasses.replace(rows[best], best=True)
    return rows
