"""kvscope report: one self-contained HTML file; in headless Chromium every chart draws, nothing errs, nothing loads.

The browser tests need Debian's `chromium` (`make browser-test` installs it); plain `pytest` skips them
without it. The screenshot lands in build/artifacts/report.png (KVSCOPE_ARTIFACTS overrides the folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kvscope.analyzer.html_report import plotly_js
from kvscope.cli.main import main
from kvscope.trace.synth import SynthSpec, build_synthetic_trace

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "traces" / "pythia-1.4b", ROOT / "traces" / "gpt-oss-20b-shrunk"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
browser = pytest.mark.browser
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser-test installs it)")


def _report(paths: list[Path], out: Path, capsys: pytest.CaptureFixture[str] | None = None) -> str:
    assert main(["report", *map(str, paths), "-o", str(out)]) == 0
    return out.read_text(encoding="utf-8")


def _figures(page: str) -> dict[str, dict]:
    blob = re.search(r'<script type="application/json" id="kvscope-figures">(.*?)</script>', page, re.S)
    assert blob is not None
    return json.loads(blob.group(1))


def test_report_of_the_shipped_traces_is_self_contained(tmp_path: Path) -> None:
    page = _report(SHIPPED, tmp_path / "report.html")
    size = len(page.encode())
    assert size < 6 * (1 << 20), size  # plotly.min.js is 4.6 MiB of it
    figures = _figures(page)
    charts = re.findall(r'<div class="chart" id="([^"]+)" data-fig="([^"]+)">', page)
    assert len(charts) == len(figures) == 10 and {fig for _, fig in charts} == set(figures)
    # one section per run and a comparison table; every verdict line links to a chart that exists
    assert page.count("<section") == 2 and "<h2>Comparison</h2>" in page
    links = set(re.findall(r'<a href="#(run\d+-\w+)">chart</a>', page))
    assert links and links <= {c for c, _ in charts}
    # sliding and full layers drawn differently, a fit per layer type, the gap shaded
    kv = next(f for k, f in figures.items() if k.endswith("-kv") and any(
        "sliding" in t.get("name", "") for t in f["data"]))
    dashes = {t["name"]: t["line"]["dash"] for t in kv["data"] if t.get("showlegend")}
    assert dashes == {"full_attention": "solid", "sliding_attention": "dash"}
    assert any(t["name"].startswith("fit full_attention") for t in kv["data"])
    assert any("saturated at 127 tokens" in t["name"] for t in kv["data"])
    memory = figures["run0-memory"]
    assert [t.get("fill") for t in memory["data"][:2]] == [None, "tonexty"]
    assert len([s for s in memory["layout"]["shapes"] if s["type"] == "line"]) == 8  # 4 generations, start and end
    # no network: a CSP forbids every request; no src/href leaves the page
    assert "default-src 'none'" in page
    assert not re.search(r'(src|href)="(?!#)', page.replace(plotly_js(), ""))


def test_chart_values_are_the_traces(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    page = _report([SHIPPED[0]], tmp_path / "one.html")
    figures = _figures(page)
    steps = pq.read_table(next((SHIPPED[0] / "steps").glob("part-*.parquet"))).to_pylist()
    series = {t["name"]: t["y"] for t in figures["run0-memory"]["data"]}
    assert series["allocated"] == [round(s["allocated_bytes"] / (1 << 20), 4) for s in steps]
    gens = pq.read_table(next((SHIPPED[0] / "generations").glob("part-*.parquet"))).to_pylist()
    bars = {t["name"]: t["y"] for t in figures["run0-gens"]["data"]}
    assert bars["after empty_cache"] == [round(g["post_empty_cache_allocated_bytes"] / (1 << 20), 4) for g in gens]
    bpt = figures["run0-bpt"]["data"]
    assert set(bpt[0]["y"]) == {8192.0} and bpt[1]["y"] == [8192.0, 8192.0]  # pythia-1.4b: 8 KiB, as the geometry


def test_trace_strings_are_escaped(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    trace = build_synthetic_trace(tmp_path / "evil", SynthSpec(
        run_id="r</script><b>", model_name=evil, layer_types=("</script><script>alert(2)</script>",) * 4))
    page = _report([trace], tmp_path / "evil.html")
    body = page.replace(plotly_js(), "")
    assert evil not in body and "alert(2)</script>" not in body
    assert html_escaped(evil) in body
    assert len(re.findall(r"<script\b", body)) == 4 and len(re.findall(r"</script>", body)) == 4
    assert not re.search(r"<img\b", body)
    _figures(page)  # still valid JSON


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_usage_errors(tmp_path: Path) -> None:
    assert main(["report"]) == 2
    assert main(["report", str(SHIPPED[0]), "-o", str(tmp_path)]) == 2
    assert main(["report", str(SHIPPED[0]), "-o", str(tmp_path / "missing" / "r.html")]) == 2
    assert main(["report", str(tmp_path / "nope")]) == 2


# --- in a browser ------------------------------------------------------------------------------

def _chromium(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked for: URL requests in Chromium's net log with a real initiator (the
    browser's own update and account checks have none)."""
    log = json.loads(netlog.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    return [ev["params"]["url"] for ev in log["events"]
            if types.get(ev["type"]) == "URL_REQUEST_START_JOB"
            and ev.get("params", {}).get("initiator", "not an origin") != "not an origin"]


def _load(page: Path, tmp: Path) -> tuple[str, list[str]]:
    netlog = tmp / "net.json"
    result = _chromium(["--virtual-time-budget=20000", f"--log-net-log={netlog}", "--dump-dom", page.as_uri()],
                       tmp / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, _page_requests(netlog)


@browser
@needs_chromium
def test_report_draws_every_chart_in_headless_chromium(tmp_path: Path) -> None:
    started = time.monotonic()
    page = tmp_path / "report.html"
    html = _report(SHIPPED, page)
    charts = len(_figures(html))
    dom, requests = _load(page, tmp_path)
    errors = re.search(r'<pre id="kvscope-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == "", errors.group(1)
    assert '<html lang="en">' in dom  # no data-errors attribute: nothing failed before the body either
    assert f'data-charts-drawn="{charts}"' in dom
    assert dom.count('data-drawn="true"') == charts and 'data-drawn="false"' not in dom
    assert dom.count('class="main-svg"') >= charts  # plotly drew an SVG into every chart
    assert requests == []
    artifacts = Path(os.environ.get("KVSCOPE_ARTIFACTS", ROOT / "build" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    result = _chromium(["--virtual-time-budget=20000", "--window-size=1280,7000", f"--screenshot={shot}",
                        page.as_uri()], tmp_path / "profile2")
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"browser test: {time.monotonic() - started:.1f} s, screenshot {shot}")


@browser
@needs_chromium
def test_the_browser_checks_catch_errors_and_requests(tmp_path: Path) -> None:
    """The same checks on a page that errs and fetches: they must fail it (so the test above can fail)."""
    page = tmp_path / "bad.html"
    good = _report([SHIPPED[0]], tmp_path / "good.html")
    bad = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", good, count=1)
    bad = bad.replace("</body>", "<script>console.error('boom')</script><img src=\"http://127.0.0.1:9/nothing.png\">"
                      "</body>", 1)
    assert bad.count("console.error('boom')") == 1 and "Content-Security-Policy" not in bad
    page.write_text(bad)
    dom, requests = _load(page, tmp_path)
    assert "console.error: boom" in dom
    assert any(url.startswith("http://127.0.0.1:9/") for url in requests), requests


def test_head_statistics_become_heat_maps(tmp_path: Path) -> None:
    from kvscope.trace.writer import TraceWriter

    trace = build_synthetic_trace(tmp_path / "heads", SynthSpec(run_id="h", steps=16))
    rows: dict[str, list] = {k: [] for k in ("run_id", "gen_id", "step", "layer", "head", "stat", "value", "tokens",
                                             "source")}
    for step in (4, 8):
        for layer in range(4):
            for head in range(8):
                for stat, value in (("key_norm_mean", layer + head / 10 + step), ("entropy_mean", 0.5 * head)):
                    for k, v in zip(rows, ("h", 0, step, layer, head, stat, value, 64 + step, "online"), strict=True):
                        rows[k].append(v)
    with TraceWriter(trace) as w:
        w.extend("head_stats", rows)
    figures = _figures(_report([trace], tmp_path / "heads.html"))
    key, entropy = figures["run0-heads"]["data"][0], figures["run0-heads1"]["data"][0]
    assert key["type"] == entropy["type"] == "heatmap"
    assert key["y"] == [0, 1, 2, 3] and key["x"] == list(range(8))
    assert key["z"][2][3] == pytest.approx(2 + 0.3 + 6)  # the mean over the two sampled steps
    assert entropy["z"][0] == [0.5 * h for h in range(8)]
    plain = _figures(_report([SHIPPED[0]], tmp_path / "plain.html"))
    assert not any(k.startswith("run0-heads") for k in plain)


def test_a_cpu_trace_reports_what_it_has(tmp_path: Path) -> None:
    trace = build_synthetic_trace(tmp_path / "cpu", SynthSpec(run_id="cpu", device="cpu", generations=2))
    page = _report([trace], tmp_path / "cpu.html")
    assert set(_figures(page)) == {"run0-kv", "run0-bpt"}
    assert page.count('<p class="note"') == 3  # memory, per generation, heads: each says why it is absent
    assert "Not drawn: no allocator readings (CPU run)." in page
    assert 'href="#run0-memory"' not in page  # no link to a chart that is not there


def test_layers_of_their_own_geometry_get_one_geometry_mark_each(tmp_path: Path) -> None:
    # Gemma 4 31B (shipped lab twin): 50 sliding layers of 16 KiB and 10 full layers of 8 KiB per
    # token, each as its own geometry says; one dashed line at 16 KiB would misplace the full layers
    twin = Path(__file__).resolve().parents[2] / "traces" / "lab" / "twins" / "gemma-4-31b"
    bars, marks = _figures(_report([twin], tmp_path / "gemma.html"))["run0-bpt"]["data"]
    assert marks["name"] == "geometry per layer" and marks["mode"] == "markers"
    full = [i for i, kind in enumerate(bars["text"]) if kind == "full_attention"]
    assert len(full) == 10 and {marks["y"][i] for i in full} == {8192.0}
    assert {y for i, y in enumerate(marks["y"]) if i not in full} == {16384.0}
    # measured as the geometry says, layer by layer (a sliding layer holds a token more than its window)
    assert all(abs(b - m) / m < 0.002 for b, m in zip(bars["y"], marks["y"], strict=True))
