"""cache_seen: generations whose cache the recorder did not see, or could not read at some steps.

A model whose state the recorder finds nowhere (generate(use_cache=False), a container it does not
know) leaves a trace with 0 KV bytes and no layer rows, which would otherwise read as a model that
holds nothing: the recorder writes a `no_cache` event per such generation and `cache_seen: false`
in the run's options; each is a warning here ("no cache seen"). A step whose cache could not be
read (an `error` event from the cache walk) has no steps or layers row: a warning with the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.untrusted import count, json_object, text

NAME = "cache_seen"


@dataclass(frozen=True)
class Config:
    # Also report steps skipped because the cache could not be read.
    report_failed_reads: bool = True


@dataclass(frozen=True)
class Measured:
    """`no_cache` and `error` events (ordered by run, generation, time) and the runs whose options
    say cache_seen false."""

    events: list[dict[str, Any]]
    unseen_runs: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    return Measured(
        t.records("SELECT run_id, gen_id, kind, detail FROM events "
                  "WHERE kind IN ('no_cache', 'error') ORDER BY run_id, gen_id, t_ns"),
        t.records("SELECT run_id, options FROM run WHERE options LIKE '%\"cache_seen\": false%' ORDER BY run_id"))


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings: list[Finding] = []
    seen: set[tuple[str, int | None]] = set()
    for e in m.events:
        detail = json_object(e["detail"])
        if e["kind"] == "no_cache":
            seen.add((e["run_id"], e["gen_id"]))
            findings.append(Finding(
                NAME, "warning", e["run_id"], e["gen_id"], None, "no_cache_steps", count(detail.get("steps")) or 0, None,
                f"no cache seen in generation {e['gen_id']} ({text(detail.get('model_type')) or 'model'}): the recorder found "
                "no KV cache or recurrent state it can read, so its 0 KV bytes say nothing about the model's memory; "
                "record with use_cache on, or report the cache class.",
                {"cache_class": detail.get("cache_class"), "steps": detail.get("steps")},
            ))
        elif cfg.report_failed_reads and detail.get("source") == "cache_walk":
            failed = count(detail.get("failed_steps")) or 1
            findings.append(Finding(
                NAME, "warning", e["run_id"], e["gen_id"], None, "unreadable_cache_steps", failed, None,
                f"the recorder could not read the cache at {failed} step(s) of generation {e['gen_id']} (first "
                f"{detail.get('first_step')}, last {detail.get('last_step')}: {detail.get('exception')}); those steps "
                "have no rows, so curves skip them.",
                {k: detail.get(k) for k in ("first_step", "last_step", "failed_steps", "exception", "message")},
            ))
    for r in m.unseen_runs:
        gens = json_object(r["options"]).get("cache_not_seen_generations")
        gens = gens if isinstance(gens, list) and gens else [None]
        for gen in gens:
            if (r["run_id"], gen) not in seen and isinstance(gen, int | None):
                findings.append(Finding(
                    NAME, "warning", r["run_id"], gen, None, "no_cache_steps", 0, None,
                    f"no cache seen in generation {gen} (run options: cache_seen false): its 0 KV bytes say nothing "
                    "about the model's memory.", {}))
    return findings


DETECTOR = Detector(NAME, Config, summary="generations whose cache the recorder did not see or could not read",
                    measure=measure, judge=judge)
