"""The report's figures: plain plotly JSON per run, built from the loaded traces.

Per run: KV bytes against tokens per layer (sliding and full layers drawn differently, with the
fit), allocated / reserved / NVML used over time with generation boundaries and the reserved −
allocated gap shaded, per-generation bars and the retention split by cause, bytes per token per
layer against the geometry, and head statistics when the trace has them. Every string from a trace
is HTML-escaped here (`esc`) before it goes into a figure; `kvscope.analyzer.html_report` renders
the page around them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvscope.analyzer.aspects import no_readings
from kvscope.analyzer.findings import human_bytes
from kvscope.analyzer.geometry import dtype_bytes, geometry
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.summaries import layer_summary
from kvscope.analyzer.verdict import RunVerdict, Verdict

MIB = float(1 << 20)
MAX_LAYER_POINTS = 240  # points per layer curve
MAX_TIMELINE_POINTS = 3000  # points per memory series
# Colours: full layers blue, sliding orange, latent green, others grey; memory series.
TYPE_COLOURS = {"full_attention": "#1f77b4", "sliding_attention": "#ff7f0e", "latent": "#2ca02c"}


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def esc(x: object) -> str:
    """HTML-escaped text (quotes too): every string from a trace goes through it."""
    return html.escape(str(x), quote=True)


def _stride(n: int, limit: int) -> int:
    return max(1, math.ceil(n / limit))


def _mib(values: Sequence[Any]) -> list[float | None]:
    return [None if v is None else round(v / MIB, 4) for v in values]


@dataclass
class RunCharts:
    """One run's figures (plotly JSON) and where they are anchored."""

    index: int
    verdict: RunVerdict
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # anchor suffix -> figure
    notes: dict[str, str] = field(default_factory=dict)  # anchor suffix -> why a chart is absent

    def anchor(self, what: str) -> str:
        return f"run{self.index}-{what}"


def _layout(title: str, xtitle: str, ytitle: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": esc(title), "font": {"size": 14}}, "height": 380,
        "margin": {"l": 64, "r": 16, "t": 40, "b": 48},
        "xaxis": {"title": {"text": esc(xtitle)}, "zeroline": False},
        "yaxis": {"title": {"text": esc(ytitle)}, "zeroline": False, "rangemode": "tozero"},
        "legend": {"orientation": "h", "y": -0.2}, "hovermode": "closest", "paper_bgcolor": "white",
        "plot_bgcolor": "#fafafa",
    }
    layout.update(extra)
    return layout


def _kv_figure(t: LoadedTraces, run_id: str) -> dict[str, Any] | None:
    """KV bytes against tokens of context per layer, for the run's longest generation, with fits."""
    longest = t.records(f"""
        SELECT gen_id, count(*) AS n FROM steps WHERE run_id = {_q(run_id)}
        GROUP BY gen_id ORDER BY max(seq_len) DESC, gen_id DESC LIMIT 1""")
    if not longest:
        return None
    gen, n = longest[0]["gen_id"], longest[0]["n"]
    stride = _stride(n, MAX_LAYER_POINTS)
    rows = t.records(f"""
        SELECT l.layer, any_value(l.layer_type) AS layer_type,
          list(s.seq_len ORDER BY l.step) AS x, list(l.kv_bytes ORDER BY l.step) AS y,
          list(l.stored_tokens ORDER BY l.step) AS stored
        FROM layers l JOIN steps s USING (run_id, gen_id, step)
        WHERE l.run_id = {_q(run_id)} AND l.gen_id = {int(gen)}
          AND (l.step % {stride} = 0 OR l.step = (SELECT max(step) FROM steps
                                                   WHERE run_id = {_q(run_id)} AND gen_id = {int(gen)}))
        GROUP BY l.layer ORDER BY l.layer""")
    if not rows:
        return None
    data: list[dict[str, Any]] = []
    shown_types: set[str] = set()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        kind = str(r["layer_type"])
        by_type.setdefault(kind, []).append(r)
        sliding = "sliding" in kind
        data.append({
            "type": "scatter", "mode": "lines", "x": r["x"], "y": _mib(r["y"]), "name": esc(kind),
            "legendgroup": esc(kind), "showlegend": kind not in shown_types,
            "line": {"color": TYPE_COLOURS.get(kind, "#7f7f7f"), "width": 1.5, "dash": "dash" if sliding else "solid"},
            "hovertemplate": f"layer {int(r['layer'])} ({esc(kind)})<br>%{{x}} tokens: %{{y:.3f}} MiB<extra></extra>",
        })
        shown_types.add(kind)
    import numpy as np

    for kind, group in by_type.items():  # a least-squares line per layer type, over the growing part
        rep = group[len(group) // 2]
        x, y, stored = (np.array(rep[k], dtype=float) for k in ("x", "y", "stored"))
        cap = stored.max()
        saturates = bool((stored == cap).sum() > 2 and cap < x.max())  # holds fewer tokens than the context
        growing = stored < cap if saturates else np.ones(len(x), dtype=bool)
        if saturates and growing.any():
            growing[int(np.argmax(stored == cap))] = True
        fit_end = float(x.min())
        if growing.sum() >= 2 and np.ptp(x[growing]) > 0:
            slope, intercept = np.polyfit(x[growing], y[growing], 1)
            fx = [float(x[growing].min()), float(x[growing].max())]
            fit_end = fx[1]
            data.append({
                "type": "scatter", "mode": "lines", "x": fx, "y": [round((intercept + slope * v) / MIB, 4) for v in fx],
                "name": esc(f"fit {kind}: {human_bytes(slope)} per token"), "legendgroup": esc(kind),
                "line": {"color": "black", "width": 1, "dash": "dot"}, "hoverinfo": "name",
            })
        if saturates:
            data.append({
                "type": "scatter", "mode": "lines", "x": [fit_end, float(x.max())],
                "y": [round(float(y.max()) / MIB, 4)] * 2, "legendgroup": esc(kind),
                "name": esc(f"{kind} saturated at {int(cap):,} tokens"),
                "line": {"color": "grey", "width": 1, "dash": "dot"}, "hoverinfo": "name",
            })
    return {"data": data, "layout": _layout(f"KV bytes per layer, generation {int(gen)}", "tokens of context",
                                            "KV bytes per layer (MiB)")}


def _memory_figure(t: LoadedTraces, run_id: str) -> dict[str, Any] | None:
    """Allocated, reserved and NVML used over time, the reserved − allocated gap shaded."""
    n = t.records(f"SELECT count(*) AS n FROM steps WHERE run_id = {_q(run_id)} AND allocated_bytes IS NOT NULL")
    if not n or not n[0]["n"]:
        return None
    stride = _stride(int(n[0]["n"]), MAX_TIMELINE_POINTS)
    rows = t.records(f"""
        SELECT t_ns, allocated_bytes AS a, reserved_bytes AS r, nvml_used_bytes AS u, kv_bytes AS kv
        FROM (SELECT *, row_number() OVER (ORDER BY t_ns) - 1 AS i FROM steps WHERE run_id = {_q(run_id)})
        WHERE i % {stride} = 0 ORDER BY t_ns""")
    xs = [round(r["t_ns"] / 1e9, 6) for r in rows]

    def series(key: str, name: str, colour: str, **extra: Any) -> dict[str, Any]:
        return {"type": "scatter", "mode": "lines", "x": xs, "y": _mib([r[key] for r in rows]), "name": name,
                "line": {"color": colour, "width": 1.5}, "hovertemplate": f"{name}: %{{y:.1f}} MiB<extra></extra>",
                **extra}

    data = [series("a", "allocated", "#1f77b4"),
            series("r", "reserved (gap to allocated shaded)", "#d62728", fill="tonexty",
                   fillcolor="rgba(214,39,40,0.18)")]
    if any(r["u"] is not None for r in rows):
        data.append(series("u", "NVML used", "#9467bd"))
    data.append(series("kv", "KV cache", "#2ca02c"))
    shapes, notes = [], []
    for g in t.records(f"SELECT gen_id, started_ns, ended_ns FROM generations WHERE run_id = {_q(run_id)} "
                       "ORDER BY gen_id"):
        for edge in (g["started_ns"], g["ended_ns"]):
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": edge / 1e9, "x1": edge / 1e9,
                           "y0": 0, "y1": 1, "line": {"color": "#888", "width": 1, "dash": "dot"}})
        notes.append({"x": g["started_ns"] / 1e9, "y": 1.02, "xref": "x", "yref": "paper", "showarrow": False,
                      "text": f"gen {int(g['gen_id'])}", "xanchor": "left", "font": {"size": 10}})
    for ev in t.records(f"SELECT t_ns, kind FROM events WHERE run_id = {_q(run_id)} AND kind IN ('oom', 'marker') "
                        "ORDER BY t_ns LIMIT 200"):
        colour = "#d62728" if ev["kind"] == "oom" else "#17becf"
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": ev["t_ns"] / 1e9, "x1": ev["t_ns"] / 1e9,
                       "y0": 0, "y1": 1, "line": {"color": colour, "width": 2}})
        notes.append({"x": ev["t_ns"] / 1e9, "y": 0.95, "xref": "x", "yref": "paper", "showarrow": False,
                      "text": esc(ev["kind"]), "font": {"size": 10, "color": colour}})
    return {"data": data, "layout": _layout("device memory over the run", "seconds since the run started", "MiB",
                                            shapes=shapes, annotations=notes)}


_POINTS = (("baseline", "baseline"), ("peak", "peak"), ("post_release", "after release"),
           ("post_empty_cache", "after empty_cache"))


def _generation_figures(t: LoadedTraces, run_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Bars per generation: allocated at the four readings; retention above baseline split by cause."""
    rows = t.records(f"SELECT * FROM generations WHERE run_id = {_q(run_id)} ORDER BY gen_id")
    if not rows or all(r["baseline_allocated_bytes"] is None for r in rows):
        return None, None
    gens = [f"gen {int(r['gen_id'])}" for r in rows]
    bars = [{"type": "bar", "x": gens, "y": _mib([r[f"{key}_allocated_bytes"] for r in rows]), "name": label,
             "hovertemplate": f"{label}: %{{y:.1f}} MiB allocated<extra></extra>"} for key, label in _POINTS]
    readings = {"data": bars, "layout": _layout("allocated memory per generation", "generation", "MiB allocated",
                                                barmode="group")}

    def retained(r: dict[str, Any], high: str, low: str | None) -> float | None:
        """(high - low) after the generation minus the same at its baseline; None where any reading is null."""
        values = [r[f"post_empty_cache_{high}"], r[f"post_empty_cache_{low}"] if low else 0,
                  r[f"baseline_{high}"], r[f"baseline_{low}"] if low else 0]
        return None if any(v is None for v in values) else (values[0] - values[1]) - (values[2] - values[3])

    causes = []
    for name, colour, fn in (
            ("live tensors", "#d62728", lambda r: retained(r, "allocated_bytes", None)),
            ("allocator pools", "#ff7f0e", lambda r: retained(r, "reserved_bytes", "allocated_bytes")),
            ("outside PyTorch", "#9467bd", lambda r: retained(r, "nvml_used_bytes", "reserved_bytes"))):
        causes.append({"type": "bar", "x": gens, "y": _mib([fn(r) for r in rows]), "name": name,
                       "marker": {"color": colour},
                       "hovertemplate": f"{name}: %{{y:.2f}} MiB retained<extra></extra>"})
    retention = {"data": causes, "layout": _layout("memory retained after each generation, by cause", "generation",
                                                   "MiB above the generation's baseline", barmode="relative")}
    return readings, retention


def _bpt_figure(t: LoadedTraces, run_id: str) -> dict[str, Any] | None:
    """Bytes per token per layer at the longest generation's last step, against the geometry."""
    summary = layer_summary(t)
    rows = t.records(f"""
        SELECT layer, layer_type, k_dtype,
          kv_bytes::DOUBLE / (greatest(batch_size, 1) * nullif(coalesce(capacity_tokens, stored_tokens), 0)) AS bpt
        FROM {summary} WHERE run_id = {_q(run_id)}
          AND gen_id = (SELECT gen_id FROM {summary} WHERE run_id = {_q(run_id)}
                        ORDER BY last_seq_len DESC NULLS LAST, gen_id DESC LIMIT 1)
        ORDER BY layer""")
    if not rows:
        return None
    run = t.records(f"SELECT model_config, model_type, layer_types FROM run WHERE run_id = {_q(run_id)} LIMIT 1")
    expected: list[float | None] = []  # per layer: a model's layers can differ (Gemma 4's full layers)
    if run:
        geo = geometry(run[0]["model_config"], run[0]["model_type"], run[0]["layer_types"])
        size = geo.dtype_bytes or dtype_bytes(rows[0]["k_dtype"])
        for r in rows:
            elements = geo.elements_for(int(r["layer"]))
            expected.append(elements * size if elements and size else None)
    colours = [TYPE_COLOURS.get(str(r["layer_type"]), "#7f7f7f") for r in rows]
    data: list[dict[str, Any]] = [{
        "type": "bar", "x": [int(r["layer"]) for r in rows], "y": [r["bpt"] for r in rows], "name": "measured",
        "marker": {"color": colours}, "text": [esc(r["layer_type"]) for r in rows], "textposition": "none",
        "hovertemplate": "layer %{x} (%{text}): %{y:,.0f} bytes per token<extra></extra>"}]
    xs = [int(r["layer"]) for r in rows]
    if expected and None not in expected and len(set(expected)) == 1:
        data.append({"type": "scatter", "mode": "lines", "x": [min(xs) - 0.5, max(xs) + 0.5], "y": expected[:1] * 2,
                     "name": f"geometry: {expected[0]:,.0f} bytes", "line": {"color": "black", "dash": "dash"}})
    elif any(e is not None for e in expected):  # one mark per layer where layers differ
        data.append({"type": "scatter", "mode": "markers", "x": xs, "y": expected, "name": "geometry per layer",
                     "marker": {"color": "black", "symbol": "line-ew-open", "size": 14},
                     "hovertemplate": "layer %{x}: geometry %{y:,.0f} bytes per token<extra></extra>"})
    return {"data": data, "layout": _layout("bytes per token per layer against the geometry", "layer",
                                            "bytes per token (per sequence)")}


def _heads_figures(t: LoadedTraces, run_id: str) -> list[dict[str, Any]]:
    figs = []
    for stat, title, scale in (("key_norm_mean", "mean key norm per kv head", "Viridis"),
                               ("value_norm_mean", "mean value norm per kv head", "Viridis"),
                               ("entropy_mean", "mean attention entropy per head (nats)", "Cividis")):
        rows = t.records(f"""
            SELECT layer, head, avg(value) AS v FROM head_stats WHERE run_id = {_q(run_id)} AND stat = {_q(stat)}
            GROUP BY layer, head ORDER BY layer, head""")
        if not rows:
            continue
        layers = sorted({int(r["layer"]) for r in rows})
        heads = sorted({int(r["head"]) for r in rows})
        grid = {(int(r["layer"]), int(r["head"])): r["v"] for r in rows}
        z = [[grid.get((layer, head)) for head in heads] for layer in layers]
        figs.append({"data": [{"type": "heatmap", "z": z, "x": heads, "y": layers, "colorscale": scale,
                               "hovertemplate": "layer %{y}, head %{x}: %{z:.4g}<extra></extra>"}],
                     "layout": _layout(title, "head", "layer")})
    return figs


def run_charts(t: LoadedTraces, verdict: Verdict) -> list[RunCharts]:
    """The figures of every run in the verdict."""
    out = []
    for i, rv in enumerate(verdict.runs):
        rc = RunCharts(i, rv)
        for key, fig, why in (("kv", _kv_figure(t, rv.run_id), "the trace has no layers rows"),
                              ("memory", _memory_figure(t, rv.run_id), no_readings(rv.facts))):
            if fig:
                rc.figures[key] = fig
            else:
                rc.notes[key] = why
        readings, retention = _generation_figures(t, rv.run_id)
        if readings and retention:
            rc.figures["gens"], rc.figures["retention"] = readings, retention
        else:
            rc.notes["gens"] = no_readings(rv.facts, "memory readings around generations")
        bpt = _bpt_figure(t, rv.run_id)
        if bpt:
            rc.figures["bpt"] = bpt
        else:
            rc.notes["bpt"] = "the trace has no layers rows"
        heads = _heads_figures(t, rv.run_id)
        for k, fig in enumerate(heads):
            rc.figures[f"heads{k}" if k else "heads"] = fig
        if not heads:
            rc.notes["heads"] = ("no head statistics in this trace (kvscope kernels TRACE, or record with "
                                 "--head-stats-every N)")
        out.append(rc)
    return out
