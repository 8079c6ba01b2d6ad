"""The dashboard in a real browser: build the report from the committed ``results/``, open it
in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser is downloaded),
and check that every plot rendered with the traces the builders made, that a dropdown
switches views, and that the console shows no errors. A full-page screenshot is saved to
``artifacts/dashboard.png`` (``$KWB_ARTIFACTS`` overrides the folder).

Skips with the reason when Playwright or Chromium is missing; CI installs both
(``apt-get install chromium``, ``pip install playwright``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dashboards import data as d
from dashboards.report import build_report, sections

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"
ARTIFACTS = Path(os.environ.get("KWB_ARTIFACTS", REPO / "artifacts"))
CHROMIUM = os.environ.get("KWB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [  # headless as root, nothing reaching out: no sandbox, GPU, QUIC, sync or updates
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright; it drives Debian's chromium)"
)
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KWB_CHROMIUM)"
)

PLOTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
    id: gd.id,
    traces: gd.data.length,
    visible: gd.data.filter(t => t.visible !== false).length,
    svgs: gd.querySelectorAll('.main-svg').length,
    width: gd.getBoundingClientRect().width,
    height: gd.getBoundingClientRect().height,
    title: gd.layout.title && gd.layout.title.text,
}))"""


@pytest.fixture(scope="module")
def expected() -> dict[str, int]:
    """Plot div id -> number of traces the builders made from the committed results."""
    records = list(d.load_results(RESULTS).records)
    return {s.key: len(s.build().data) for s in sections(records)}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The report open in headless Chromium, with everything the console said while loading."""
    report = build_report(RESULTS, tmp_path_factory.mktemp("dashboard") / "report.html")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        messages: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: messages.append(f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"page error: {e}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri(), wait_until="load")
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
        yield page, messages, requests
        browser.close()


def test_committed_results_make_every_view():
    results = d.load_results(RESULTS)
    assert results.records, f"no results in {RESULTS}"
    assert not results.problems, results.problems


def test_every_plot_rendered_with_its_traces(loaded, expected):
    page, _, _ = loaded
    plots = page.evaluate(PLOTS_JS)
    assert [p["id"] for p in plots] == list(expected)
    assert set(expected) == {"roofline", "speedup", "heatmap", "strategies", "gpus", "telemetry"}
    for plot in plots:
        assert plot["svgs"] >= 1, f"{plot['id']}: no SVG drawn"
        assert plot["traces"] == expected[plot["id"]], plot
        assert plot["visible"] >= 1 and plot["width"] > 300 and plot["height"] > 200, plot
    # marks actually drawn: scatter points, bars, heatmap image
    assert page.locator("#roofline .scatterlayer .point").count() >= 3
    assert page.locator("#strategies .barlayer .point").count() >= 2
    assert page.locator("#heatmap .hm image").count() == 1


def test_screenshot_artifact(loaded):
    """Before any interaction: the page as it opens."""
    page, _, _ = loaded
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_heatmap_dropdown_switches_bucket(loaded):
    page, _, _ = loaded
    heatmap = page.locator("#heatmap")
    before = page.evaluate("() => document.getElementById('heatmap').layout.title.text")
    heatmap.locator(".updatemenu-header").click()
    buttons = heatmap.locator(".updatemenu-dropdown-button")
    labels = buttons.all_text_contents()
    assert len(labels) > 1
    # the entry next to the shown one: with many buckets plotly's menu is a scroll box opened
    # at the active entry, and entries scrolled out of its window take no clicks
    # a label is "bucket · kernel · gpu"; the title "Autotune: <kernel> on <gpu>, bucket <bucket><br>..."
    # (matched whole: grouped_gemm is a prefix of grouped_gemm_dw, and their buckets coincide)
    def shows(title: str, label: str) -> bool:
        bucket, kernel, gpu = label.split(" · ")
        return title.startswith(f"Autotune: {kernel} on {gpu}, bucket {bucket}<br>")

    active = next(i for i, label in enumerate(labels) if shows(before, label))
    target = labels[active + 1] if active + 1 < len(labels) else labels[active - 1]
    buttons.filter(has_text=target).first.click()
    bucket, kernel, gpu = target.split(" · ")
    page.wait_for_function("(p) => document.getElementById('heatmap').layout.title.text.startsWith(p)",
                           arg=f"Autotune: {kernel} on {gpu}, bucket {bucket}<br>")
    shown = page.evaluate("() => document.getElementById('heatmap').data.filter(t => t.visible !== false).length")
    assert shown >= 1
    assert page.locator("#heatmap .hm image").count() == 1


def test_no_console_errors_and_no_network(loaded):
    page, messages, requests = loaded
    errors = [m for m in messages if m.startswith(("console.error", "page error"))]
    assert not errors, errors
    assert all(url.startswith(("file:", "data:", "blob:", "about:")) for url in requests), requests
