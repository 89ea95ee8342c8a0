"""`kvscope report`: one self-contained HTML file per analysis, readable with no network.

The page holds the verdict and findings first, each linked to the chart that shows it, then per
run the charts of `kvscope.analyzer.report_figures` (KV bytes against tokens per layer, device
memory over time, per-generation readings and retention, bytes per token per layer against the
geometry, head statistics); for several runs, a comparison table.

Charts are drawn by plotly.js, inlined from the `plotly` Python package (its wheel ships
plotly.min.js; the Python side of plotly is never imported): one script, no CDN, no fetch. The
figures are plain JSON; a Content-Security-Policy forbids the page any request. Every
string from a trace is HTML-escaped (traces are untrusted input) and the figure JSON is embedded
with <, > and & escaped, so nothing in a trace can close a tag or start a script.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

from kvscope.analyzer.findings import Finding, human_bytes, metric_value_text, span_text
from kvscope.analyzer.load import LoadedTraces
from kvscope.analyzer.report_figures import RunCharts, esc, run_charts
from kvscope.analyzer.verdict import Verdict, aspect_of
from kvscope.errors import KvscopeError

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


def _finite(obj: Any) -> Any:
    """`obj` with NaN and infinities as None (a trace's doubles may hold them; JSON has no such value)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element: <, > and & escaped, so no string can close the tag."""
    text = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _status(s: str) -> str:
    return f'<span class="st st-{esc(s)}">{esc(s)}</span>'


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
        rows.append(f"<tr><td>{_status(g.severity)}</td><td>{esc(g.detector)}</td><td>{esc(g.metric)}</td>"
                    f'<td class="num">{esc(value)}</td><td>{esc(where)}</td><td>{esc(g.message)}</td><td>{link}</td></tr>')
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
        rows.append(f"<tr><td>{_status(f.severity)}</td><td>{esc(f.detector)}</td>"
                    f"<td class=\"num\">{'' if f.gen_id is None else f.gen_id}</td>"
                    f"<td class=\"num\">{'' if f.layer is None else f.layer}</td><td>{esc(f.metric)}</td>"
                    f'<td class="num">{esc(metric_value_text(f.metric, f.value))}</td><td>{esc(f.message)}</td>'
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
    out.append(f"<h2>{esc(title)}</h2>" if several else f"<h1>{esc(title)}</h1>")
    out.append(f'<p class="headline">{_status(rv.severity if rv.headline != "healthy" else "ok")} '
               f"{esc(rv.headline)}</p><p class=\"muted\">{esc(rv.context)}"
               + (f"<br>trace <code>{esc(rv.trace)}</code>" if rv.trace else "") + "</p>")
    rows = []
    for a in rv.aspects:
        anchor = ANCHOR_OF_ASPECT[a.name]
        link = f'<a href="#{rc.anchor(anchor)}">chart</a>' if anchor in rc.figures else ""
        rows.append(f"<tr><th>{esc(a.title)}</th><td>{_status(a.status)}</td><td>{esc(a.text)}</td><td>{link}</td></tr>")
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
            out.append(f"<h3>{esc(heading)}</h3>")
        if key in rc.figures:
            out.append(f'<div class="chart" id="{rc.anchor(key)}" data-fig="{esc(rc.anchor(key))}"></div>')
        elif key in rc.notes:
            out.append(f'<p class="note" id="{rc.anchor(key)}">Not drawn: {esc(rc.notes[key])}.</p>')
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
        cells = [f'<a href="#{rc.anchor("top")}">{esc(rv.run_id)}</a>', esc(rv.model_name),
                 f"{_status(rv.severity if rv.headline != 'healthy' else 'ok')} {esc(rv.headline)}"]
        nums = [human_bytes(f.bytes_per_token) if f and f.bytes_per_token else "-",
                human_bytes(f.peak_kv_bytes) if f else "-", human_bytes(f.peak_allocated_bytes) if f else "-",
                f"{f.mean_fragmentation:.1%}" if f and f.mean_fragmentation is not None else "-",
                human_bytes(live) if live is not None else "-", oom.label if oom else "-"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="num">{esc(c)}</td>' for c in nums) + "</tr>")
    return f"<h2>Comparison</h2><table>{head}{''.join(rows)}</table>"


def render_html(verdict: Verdict, findings: Sequence[Finding], charts: Sequence[RunCharts],
                title: str = "KVScope report") -> str:
    """The whole page: verdict and findings first, then each run's charts; plotly.js inlined."""
    several = len(charts) > 1
    figures = {rc.anchor(k): fig for rc in charts for k, fig in rc.figures.items()}
    body = [f"<h1>{esc(title)}</h1>"] if several else []
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
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>", f"<script>{GUARD_JS}</script>", "</head><body>",
        '<pre id="kvscope-errors" hidden></pre>', *body,
        f'<script type="application/json" id="kvscope-figures">{_json_for_script(figures)}</script>',
        f"<script>{plotly_js()}</script>", f"<script>{DRAW_JS}</script>", "</body></html>", "",
    ])


def build_report(tables: LoadedTraces, findings: Sequence[Finding], verdict: Verdict,
                 title: str = "KVScope report") -> str:
    """The HTML report of loaded traces, their findings and verdict."""
    return render_html(verdict, findings, run_charts(tables, verdict), title)
