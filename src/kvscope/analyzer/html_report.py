"""`kvscope report`: one self-contained HTML file per analysis, readable with no network.

The page holds the verdict and findings first, each linked to the chart that shows it, then per
run: KV bytes against tokens per layer (sliding and full layers drawn differently, with the fit),
allocated / reserved / NVML used over time with generation boundaries and the reserved − allocated
gap shaded, per-generation bars (baseline, peak, after release, after empty_cache) and the
retention split by cause, bytes per token per layer against the geometry, and head statistics
when the trace has them; for several runs, a comparison table.

Charts are drawn by plotly.js, inlined from the `plotly` Python package (its wheel ships
plotly.min.js; the Python side of plotly is never imported): one script, no CDN, no fetch. The
figures are plain JSON built here; a Content-Security-Policy forbids the page any request. Every
string from a trace is HTML-escaped (traces are untrusted input) and the figure JSON is embedded
with <, > and & escaped, so nothing in a trace can close a tag or start a script.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kvscope.analyzer.findings import Finding, human_bytes, metric_value_text, span_text
from kvscope.analyzer.geometry import dtype_bytes, geometry
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.summaries import layer_summary
from kvscope.analyzer.verdict import RunVerdict, Verdict, aspect_of
from kvscope.errors import KvscopeError

MIB = float(1 << 20)
MAX_LAYER_POINTS = 240  # points per layer curve
MAX_TIMELINE_POINTS = 3000  # points per memory series
# Colours: full layers blue, sliding orange, latent green, others grey; memory series.
TYPE_COLOURS = {"full_attention": "#1f77b4", "sliding_attention": "#ff7f0e", "latent": "#2ca02c"}
ANCHOR_OF_ASPECT = {"kv_cache": "kv", "retention": "gens", "fragmentation": "memory", "outside_cache": "memory",
                    "oom": "memory"}
ANCHOR_OF_DETECTOR = {"cache_density": "bpt", "layer_anomaly": "bpt", "layer_uniformity": "kv",
                      "growth_curve": "kv", "preallocation_waste": "kv", "mla_latent": "bpt", "post_eos": "gens",
                      "fragmentation": "memory", "oom_forecast": "memory", "oom_event": "memory",
                      "dead_heads": "heads", "eviction_headroom": "heads"}


def plotly_js() -> str:
    """plotly.min.js from the installed `plotly` package (a dependency of kvscope)."""
    try:
        return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise KvscopeError("kvscope report draws its charts with plotly.js from the `plotly` package, which is "
                           "not installed: pip install plotly.") from exc


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _e(x: object) -> str:
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
        "title": {"text": _e(title), "font": {"size": 14}}, "height": 380,
        "margin": {"l": 64, "r": 16, "t": 40, "b": 48},
        "xaxis": {"title": {"text": _e(xtitle)}, "zeroline": False},
        "yaxis": {"title": {"text": _e(ytitle)}, "zeroline": False, "rangemode": "tozero"},
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
            "type": "scatter", "mode": "lines", "x": r["x"], "y": _mib(r["y"]), "name": _e(kind),
            "legendgroup": _e(kind), "showlegend": kind not in shown_types,
            "line": {"color": TYPE_COLOURS.get(kind, "#7f7f7f"), "width": 1.5, "dash": "dash" if sliding else "solid"},
            "hovertemplate": f"layer {int(r['layer'])} ({_e(kind)})<br>%{{x}} tokens: %{{y:.3f}} MiB<extra></extra>",
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
                "name": _e(f"fit {kind}: {human_bytes(slope)} per token"), "legendgroup": _e(kind),
                "line": {"color": "black", "width": 1, "dash": "dot"}, "hoverinfo": "name",
            })
        if saturates:
            data.append({
                "type": "scatter", "mode": "lines", "x": [fit_end, float(x.max())],
                "y": [round(float(y.max()) / MIB, 4)] * 2, "legendgroup": _e(kind),
                "name": _e(f"{kind} saturated at {int(cap):,} tokens"),
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
                      "text": _e(ev["kind"]), "font": {"size": 10, "color": colour}})
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

    def diff(r: dict[str, Any], post: str, base: str) -> float | None:
        return None if r[post] is None or r[base] is None else r[post] - r[base]

    causes = []
    for name, colour, fn in (
            ("live tensors", "#d62728", lambda r: diff(r, "post_empty_cache_allocated_bytes",
                                                       "baseline_allocated_bytes")),
            ("allocator pools", "#ff7f0e", lambda r: None if diff(r, "post_empty_cache_reserved_bytes",
                                                                   "post_empty_cache_allocated_bytes") is None
             or diff(r, "baseline_reserved_bytes", "baseline_allocated_bytes") is None else
             (r["post_empty_cache_reserved_bytes"] - r["post_empty_cache_allocated_bytes"])
             - (r["baseline_reserved_bytes"] - r["baseline_allocated_bytes"])),
            ("outside PyTorch", "#9467bd", lambda r: None if r["post_empty_cache_nvml_used_bytes"] is None
             or r["baseline_nvml_used_bytes"] is None else
             (r["post_empty_cache_nvml_used_bytes"] - r["post_empty_cache_reserved_bytes"])
             - (r["baseline_nvml_used_bytes"] - r["baseline_reserved_bytes"]))):
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
        "marker": {"color": colours}, "text": [_e(r["layer_type"]) for r in rows], "textposition": "none",
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
                              ("memory", _memory_figure(t, rv.run_id), "no allocator readings (CPU run)")):
            if fig:
                rc.figures[key] = fig
            else:
                rc.notes[key] = why
        readings, retention = _generation_figures(t, rv.run_id)
        if readings and retention:
            rc.figures["gens"], rc.figures["retention"] = readings, retention
        else:
            rc.notes["gens"] = "no memory readings around generations (CPU run)"
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


# --- HTML --------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:16px;
color:#222}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;white-space:nowrap}
.st{font-weight:600;white-space:nowrap}.st-ok{color:#2a7d2a}.st-note{color:#1f5fa8}.st-warning{color:#b8860b}
.st-critical{color:#c0392b}.st-n\\/a{color:#888}.chart{min-height:380px}.note{color:#666;font-style:italic}
.headline{font-size:16px;margin:4px 0}.muted{color:#666}details{margin:6px 0}code{font-size:12px}
#kvscope-errors{color:#c0392b;white-space:pre-wrap}
"""

# Runs first: records page errors, console errors and blocked requests into the DOM, so a
# headless browser's dumped DOM shows them (the browser test reads #kvscope-errors).
GUARD_JS = """
(function(){
  function note(msg){var p=document.getElementById('kvscope-errors');if(p){p.hidden=false;p.textContent+=msg+'\\n';}
    document.documentElement.setAttribute('data-errors',
      String((+document.documentElement.getAttribute('data-errors')||0)+1));}
  window.addEventListener('error',function(e){note('error: '+e.message);});
  window.addEventListener('unhandledrejection',function(e){note('unhandled rejection: '+e.reason);});
  document.addEventListener('securitypolicyviolation',function(e){note('blocked: '+e.blockedURI+' ('+e.violatedDirective+')');});
  var err=console.error;console.error=function(){note('console.error: '+Array.prototype.join.call(arguments,' '));
    return err.apply(console,arguments);};
})();
"""

DRAW_JS = """
(function(){
  var figs=JSON.parse(document.getElementById('kvscope-figures').textContent);
  var charts=document.querySelectorAll('div.chart'),done=0;
  function finished(){done++;if(done===charts.length){document.body.setAttribute('data-charts-drawn',String(done));}}
  if(!charts.length){document.body.setAttribute('data-charts-drawn','0');}
  charts.forEach(function(div){
    var f=figs[div.getAttribute('data-fig')];
    Plotly.newPlot(div,f.data,f.layout,{displaylogo:false,responsive:true}).then(function(){
      div.setAttribute('data-drawn',String(div.querySelectorAll('.main-svg').length>0));finished();});
  });
})();
"""


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element: <, > and & escaped, so no string can close the tag."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _status(s: str) -> str:
    return f'<span class="st st-{_e(s)}">{_e(s)}</span>'


def _group_rows(rc: RunCharts, groups: Sequence[Any]) -> str:
    rows = []
    for g in groups:
        value = metric_value_text(g.metric, g.value_min)
        if g.value_max != g.value_min:
            value += f" to {metric_value_text(g.metric, g.value_max)}"
        where = (f"layer {g.layer}, " if g.layer is not None else "") + (
            f"generation{'s' if len(g.gen_ids) > 1 else ''} {span_text(g.gen_ids)}" if g.gen_ids else "whole run")
        anchor = (ANCHOR_OF_ASPECT["outside_cache"] if g.aspect == "outside_cache" else
                  ANCHOR_OF_DETECTOR.get(g.detector) or ANCHOR_OF_ASPECT.get(g.aspect or "", "findings"))
        link = f'<a href="#{rc.anchor(anchor)}">chart</a>' if anchor in rc.figures else ""
        rows.append(f"<tr><td>{_status(g.severity)}</td><td>{_e(g.detector)}</td><td>{_e(g.metric)}</td>"
                    f'<td class="num">{_e(value)}</td><td>{_e(where)}</td><td>{_e(g.message)}</td><td>{link}</td></tr>')
    head = ("<tr><th>severity</th><th>detector</th><th>metric</th><th>value</th><th>where</th><th>message</th>"
            "<th></th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _findings_table(rc: RunCharts, findings: Sequence[Finding]) -> str:
    rows = []
    for f in findings:
        aspect = aspect_of(f)
        anchor = (ANCHOR_OF_ASPECT["outside_cache"] if aspect == "outside_cache" else
                  ANCHOR_OF_DETECTOR.get(f.detector) or ANCHOR_OF_ASPECT.get(aspect or "", ""))
        link = f'<a href="#{rc.anchor(anchor)}">chart</a>' if anchor in rc.figures else ""
        rows.append(f"<tr><td>{_status(f.severity)}</td><td>{_e(f.detector)}</td>"
                    f"<td class=\"num\">{'' if f.gen_id is None else f.gen_id}</td>"
                    f"<td class=\"num\">{'' if f.layer is None else f.layer}</td><td>{_e(f.metric)}</td>"
                    f'<td class="num">{_e(metric_value_text(f.metric, f.value))}</td><td>{_e(f.message)}</td>'
                    f"<td>{link}</td></tr>")
    head = ("<tr><th>severity</th><th>detector</th><th>gen</th><th>layer</th><th>metric</th><th>value</th>"
            "<th>message</th><th></th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


CHART_TITLES = (("kv", "KV bytes against tokens, per layer"), ("memory", "Device memory over time"),
                ("gens", "Per generation: readings and retention"), ("retention", None),
                ("bpt", "Bytes per token per layer against the geometry"), ("heads", "Head statistics"),
                ("heads1", None), ("heads2", None))


def _run_section(rc: RunCharts, findings: Sequence[Finding], several: bool) -> str:
    rv = rc.verdict
    out = [f'<section id="{rc.anchor("top")}">']
    title = f"{rv.model_name} — run {rv.run_id}"
    out.append(f"<h2>{_e(title)}</h2>" if several else f"<h1>{_e(title)}</h1>")
    out.append(f'<p class="headline">{_status(rv.severity if rv.headline != "healthy" else "ok")} '
               f"{_e(rv.headline)}</p><p class=\"muted\">{_e(rv.context)}"
               + (f"<br>trace <code>{_e(rv.trace)}</code>" if rv.trace else "") + "</p>")
    rows = []
    for a in rv.aspects:
        anchor = ANCHOR_OF_ASPECT[a.name]
        link = f'<a href="#{rc.anchor(anchor)}">chart</a>' if anchor in rc.figures else ""
        rows.append(f"<tr><th>{_e(a.title)}</th><td>{_status(a.status)}</td><td>{_e(a.text)}</td><td>{link}</td></tr>")
    out.append(f"<table>{''.join(rows)}</table>")
    if rv.action:
        out.append(f"<h3>Needs action ({len(rv.action)})</h3>{_group_rows(rc, rv.action)}")
    else:
        out.append("<h3>Needs action: nothing</h3>")
    if rv.info:
        n = sum(g.count for g in rv.info)
        out.append(f"<details><summary>For information: {n} finding(s) in {len(rv.info)} group(s)</summary>"
                   f"{_group_rows(rc, rv.info)}</details>")
    mine = [f for f in findings if f.run_id == rv.run_id]
    out.append(f'<details id="{rc.anchor("findings")}"><summary>Every finding ({len(mine)})</summary>'
               f"{_findings_table(rc, mine) if mine else '<p>No findings.</p>'}</details>")
    for key, heading in CHART_TITLES:
        if heading:
            out.append(f"<h3>{_e(heading)}</h3>")
        if key in rc.figures:
            out.append(f'<div class="chart" id="{rc.anchor(key)}" data-fig="{_e(rc.anchor(key))}"></div>')
        elif key in rc.notes:
            out.append(f'<p class="note" id="{rc.anchor(key)}">Not drawn: {_e(rc.notes[key])}.</p>')
    out.append("</section>")
    return "\n".join(out)


def _comparison(charts: Sequence[RunCharts]) -> str:
    head = ("<tr><th>run</th><th>model</th><th>verdict</th><th>bytes per token</th><th>peak KV</th>"
            "<th>peak allocated</th><th>fragmentation</th><th>retained (live)</th><th>OOM forecast</th></tr>")
    rows = []
    for rc in charts:
        rv, f = rc.verdict, rc.verdict.facts
        live = sum(max(g.live_bytes or 0, 0) for g in f.retention) if f and f.retention else None
        oom = rv.aspect("oom")
        cells = [f'<a href="#{rc.anchor("top")}">{_e(rv.run_id)}</a>', _e(rv.model_name),
                 f"{_status(rv.severity if rv.headline != 'healthy' else 'ok')} {_e(rv.headline)}"]
        nums = [human_bytes(f.bytes_per_token) if f and f.bytes_per_token else "-",
                human_bytes(f.peak_kv_bytes) if f else "-", human_bytes(f.peak_allocated_bytes) if f else "-",
                f"{f.mean_fragmentation:.1%}" if f and f.mean_fragmentation is not None else "-",
                human_bytes(live) if live is not None else "-", oom.label if oom else "-"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="num">{_e(c)}</td>' for c in nums) + "</tr>")
    return f"<h2>Comparison</h2><table>{head}{''.join(rows)}</table>"


def render_html(verdict: Verdict, findings: Sequence[Finding], charts: Sequence[RunCharts],
                title: str = "KVScope report") -> str:
    """The whole page: verdict and findings first, then each run's charts; plotly.js inlined."""
    several = len(charts) > 1
    figures = {rc.anchor(k): fig for rc in charts for k, fig in rc.figures.items()}
    body = [f"<h1>{_e(title)}</h1>"] if several else []
    if several:
        body.append(f"<p>{len(charts)} runs; the worst first.</p>")
        body.append(_comparison(charts))
    body.extend(_run_section(rc, findings, several) for rc in charts)
    if not charts:
        body.append("<p>No runs in the traces.</p>")
    csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
           "font-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>", f"<script>{GUARD_JS}</script>", "</head><body>",
        '<pre id="kvscope-errors" hidden></pre>', *body,
        f'<script type="application/json" id="kvscope-figures">{_json_for_script(figures)}</script>',
        f"<script>{plotly_js()}</script>", f"<script>{DRAW_JS}</script>", "</body></html>", "",
    ])


def build_report(tables: LoadedTraces, findings: Sequence[Finding], verdict: Verdict,
                 title: str = "KVScope report") -> str:
    """The HTML report of loaded traces, their findings and verdict."""
    return render_html(verdict, findings, run_charts(tables, verdict), title)
