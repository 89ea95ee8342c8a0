"""oom_event: the run ran out of device memory (critical), or a generation was cut off (info).

An `oom` event (the recorder writes one when generate raises torch.OutOfMemoryError, with the
last recorded step's readings and the allocator's state) is the most important thing in a trace:
one critical finding per event with the step, the context length, the allocator's state, the
memory cap in force, and what would have fitted — the context length at which the cache would
have stayed within the cap (or the device), holding everything outside the cache fixed. A
generation whose steps have no `generations` row ended without finishing: an exception
(`error` event), or a process killed outright (OOM killer, kill -9): reported as info.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvscope.analyzer.detectors.oom_forecast import limit_name
from kvscope.analyzer.engine import Engine
from kvscope.analyzer.findings import Finding, human_bytes
from kvscope.analyzer.registry import Detector
from kvscope.analyzer.untrusted import count, json_object, obj, text

NAME = "oom_event"
_UNITS = {"B": 1, "BYTES": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_TRIED = re.compile(r"Tried to allocate ([0-9.]+) ?([KMGT]iB|B|bytes)", re.IGNORECASE)


@dataclass(frozen=True)
class Config:
    # Report generations cut off without a generations row (a crash, a kill) as info findings.
    report_interrupted: bool = True


def tried_to_allocate(message: str | None) -> int | None:
    """The bytes of the failed allocation, from PyTorch's OOM message."""
    match = _TRIED.search(message or "")
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _oom(e: dict, cfg: Config) -> Finding:
    detail = json_object(e["detail"])  # written by the recorder, but any JSON in someone else's trace
    last = obj(detail.get("last_step"))
    alloc = {k: v for k, v in ((k, count(v)) for k, v in obj(last.get("allocator")).items()) if v is not None}
    seq = count(last.get("seq_len"))
    step = e["step"]
    context = seq + 1 if seq and step else None  # a decode step adds one token to the last step's context
    kv = count(last.get("kv_bytes"))
    in_use = alloc.get("reserved") or alloc.get("allocated")
    outside = (alloc.get("allocated") - kv) if alloc.get("allocated") is not None and kv is not None else None
    per_token = kv / seq if kv and seq else None
    limit = e["cap"] or e["steps_total"] or e["nvml_total"]
    fitting = int((limit - outside) / per_token) if limit and outside is not None and per_token else None
    tried = tried_to_allocate(text(detail.get("message")))
    where = (f"at step {step} of generation {e['gen_id']} ({context:,} tokens of context)" if context
             else f"in the prefill of generation {e['gen_id']}" if step == 0 else
             f"at step {step} of generation {e['gen_id']}")
    cap = limit_name(e["options"], limit) if e["cap"] else (f"the device's {human_bytes(limit)}" if limit else None)
    state = (f"{human_bytes(alloc.get('allocated'))} allocated and {human_bytes(alloc.get('reserved'))} reserved "
             f"at the last step ({human_bytes(kv)} of it the cache)") if alloc else "no allocator reading"
    fit_text = (f"; within {cap} about {fitting:,} tokens of context would have fitted at "
                f"{human_bytes(per_token)} of cache per token" if fitting is not None and cap else
                f" under {cap}" if cap else "")
    return Finding(
        NAME, "critical", e["run_id"], e["gen_id"], None, "oom_step", float(step if step is not None else -1), None,
        f"the run ran out of memory {where}{', tried to allocate ' + human_bytes(tried) if tried else ''}: "
        f"{state}{fit_text}; lower the context or batch, free memory outside the cache, or quantise the cache.",
        {"step": step, "context_tokens": context, "last_step": last.get("step"), "allocator_last_step": alloc,
         "allocator_now": obj(detail.get("allocator_now")) or None, "nvml_used_bytes": count(detail.get("nvml_used_bytes")),
         "tried_to_allocate_bytes": tried, "kv_bytes": kv, "in_use_bytes": in_use, "outside_cache_bytes": outside,
         "kv_bytes_per_token": per_token, "limit_bytes": limit, "memory_limit_bytes": e["cap"],
         "fitting_tokens": fitting, "exception": text(detail.get("exception"))},
    )


@dataclass(frozen=True)
class Measured:
    """`oom` events with the run's cap and device totals, and generations cut off (steps without a
    generations row, with their last error or oom event), each ordered."""

    ooms: list[dict[str, Any]]
    interrupted: list[dict[str, Any]]


def measure(t: Engine) -> Measured:
    run = """(SELECT run_id, any_value(memory_limit_bytes) AS cap, any_value(nvml_total_bytes) AS nvml_total,
                     any_value(options) AS options FROM run GROUP BY run_id)"""
    ooms = t.records(f"""
        SELECT e.run_id, e.gen_id, e.step, e.detail, r.cap, r.nvml_total, r.options,
          (SELECT max(s.nvml_total_bytes) FROM steps s WHERE s.run_id = e.run_id) AS steps_total
        FROM events e LEFT JOIN {run} r ON e.run_id = r.run_id
        WHERE e.kind = 'oom' ORDER BY e.run_id, e.t_ns""")
    interrupted = t.records("""
        WITH cut AS (
          SELECT s.run_id, s.gen_id, count(*) AS steps, max(s.step) AS last_step, arg_max(s.seq_len, s.step) AS seq_len
          FROM steps s ANTI JOIN generations g ON s.run_id = g.run_id AND s.gen_id = g.gen_id
          GROUP BY s.run_id, s.gen_id
        ), ev AS (
          SELECT run_id, gen_id, arg_max(kind, t_ns) AS kind, arg_max(detail, t_ns) AS detail
          FROM events WHERE kind IN ('oom', 'error') GROUP BY run_id, gen_id
        )
        SELECT cut.*, ev.kind, ev.detail FROM cut LEFT JOIN ev ON cut.run_id = ev.run_id AND cut.gen_id = ev.gen_id
        -- a run with no generations row and no recorder options is a hand-written trace of steps only
        WHERE coalesce(ev.kind, '') <> 'oom'
          AND (EXISTS (SELECT 1 FROM generations g WHERE g.run_id = cut.run_id)
               OR EXISTS (SELECT 1 FROM run r WHERE r.run_id = cut.run_id AND r.options IS NOT NULL)
               OR ev.kind IS NOT NULL)
        ORDER BY cut.run_id, cut.gen_id""")
    return Measured(ooms, interrupted)


def judge(m: Measured, cfg: Config) -> list[Finding]:
    findings = [_oom(e, cfg) for e in m.ooms]
    if not cfg.report_interrupted:
        return findings
    for g in m.interrupted:
        detail = json_object(g["detail"])
        why = (f"by {text(detail.get('exception')) or 'an exception'}: {(text(detail.get('message')) or '')[:120]}"
               if g["kind"] == "error" else "with no event: the process was killed (OOM killer, kill -9) or the "
               "trace was cut")
        findings.append(Finding(
            NAME, "info", g["run_id"], g["gen_id"], None, "interrupted_steps", g["steps"], None,
            f"generation {g['gen_id']} stopped after {g['steps']} recorded steps ({g['seq_len']:,} tokens) without "
            f"finishing, {why}; its memory readings after generate are missing, so retention is not judged.",
            {"steps": g["steps"], "last_step": g["last_step"], "seq_len": g["seq_len"], "event": g["kind"]},
        ))
    return findings


DETECTOR = Detector(NAME, Config, summary="out-of-memory events (critical) and generations cut off (info)",
                    measure=measure, judge=judge)
