"""The HTML report: one self-contained file that works offline.

plotly.js is embedded once, in the page head (``plotly.offline.get_plotlyjs()``); each
figure is a ``<div>`` plus a ``Plotly.newPlot`` call written with ``include_plotlyjs=False``.
No CDN, no server, no request leaves the page. Layout of the page:

- header: the GPUs, package versions, dates and number of records the page is built from;
- problems: every skipped line as ``file:line: reason``, when there are any;
- one section per figure, with a caption saying what it shows;
- an explicit "No results found in DIR" page when there is nothing to show.
"""
from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dashboards import data as d
from dashboards import figures
from profiling.results import Record

PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em 4em; color: #222; background: #fff; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.caption { color: #444; max-width: 60em; }
.facts { border-collapse: collapse; margin: 0.8em 0; }
.facts th { text-align: left; padding: 0.2em 1em 0.2em 0; color: #555; font-weight: 600; vertical-align: top; }
.facts td { padding: 0.2em 0; }
.problems { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.5em 1em; }
.problems li { font-family: ui-monospace, monospace; font-size: 0.9em; }
.empty { background: #f4f4f4; border-left: 4px solid #999; padding: 1em; font-size: 1.2em; }
.note { color: #666; font-style: italic; }
figure { margin: 0; }
"""


@dataclass(frozen=True)
class Section:
    """One figure of the report: heading, caption, and the builder that draws it."""

    key: str  # the plot div's id
    title: str
    caption: str
    build: Callable[[], go.Figure]


def sections(records: list[Record], configs_root: Path | None = None) -> list[Section]:
    """The report's figures, in page order, for ``records``."""
    measured = [r for r in records if r.mode != d.TUNE_MODE]
    tuning = [r for r in records if r.mode == d.TUNE_MODE]
    out = []
    if measured:
        out += [
            Section("roofline", "Roofline",
                    "Achieved TFLOP/s (flops / time) against arithmetic intensity (flops / bytes), log-log, one point per "
                    "shape and provider. The grey lines are this card's measured ceilings: the HBM copy rate times "
                    "intensity, then the bf16 matmul rate. Distance below the line is distance from the card's limit.",
                    lambda: figures.roofline(records)),
            Section("speedup", "Speed-up vs peers and time / floor",
                    "Top: peer time / our time on the same shape, over the swept dimension (> 1: ours is faster). "
                    "Bottom: each provider's time as a multiple of the floor, max(bytes / HBM rate, flops / matmul "
                    "rate); 1 is the floor.",
                    lambda: figures.speedup_and_floor(records)),
        ]
    if tuning:
        out += [
            Section("heatmap", "Autotune heatmap",
                    "Median time of the candidates over two block-size axes (other config fields reduced by min), per "
                    "tuning bucket (dropdown); a blank cell had no valid candidate. Star: the winner in the GPU's config "
                    "file; X: the default config.",
                    lambda: figures.autotune_heatmap(records, configs_root=configs_root)),
            Section("strategies", "Tuning strategies",
                    "Per bucket: the best time each strategy found, how many candidates it tried and its wall time. "
                    "Exhaustive is the reference; a cheaper strategy should come within a few percent of it.",
                    lambda: figures.strategy_comparison(records)),
        ]
    if measured:
        out += [
            Section("gpus", "Per-GPU comparison",
                    "Median time per shape with one bar per GPU type, per kernel, dtype and provider.",
                    lambda: figures.gpu_comparison(records)),
            Section("telemetry", "Telemetry beside timings",
                    "Each measurement's time next to the SM clock, power and temperature read while it ran (median, "
                    "min-max bars). A red ring marks a measurement whose clocks were slowed (power cap, thermal, ...).",
                    lambda: figures.telemetry(records)),
        ]
    return out


def figure_html(fig: go.Figure, div_id: str) -> str:
    """The figure's div and its ``Plotly.newPlot`` script, without plotly.js."""
    height = fig.layout.height or 500
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG,
                       default_height=f"{height}px", default_width="100%")


def _facts_table(results: d.Results) -> str:
    records = list(results.records)
    rows = []
    gpu_facts = d.gpus(records)
    rows.append(("GPUs", "<br>".join(
        f"{html.escape(info['name'])} (<code>{html.escape(slug)}</code>, driver {html.escape(', '.join(sorted(info['drivers'])) or '?')}):"
        f" {info['records']} records" for slug, info in sorted(gpu_facts.items()))))
    rows.append(("versions", html.escape("; ".join(f"{name} {', '.join(v)}" for name, v in d.versions(records).items()) or "-")))
    span = d.date_range(records)
    rows.append(("measured", html.escape(f"{span[0]} to {span[1]}" if span else "-")))
    rows.append(("records", f"{len(records)} ({len(results.measurements)} measurements, {len(results.tuning)} tuning lines)"
                 + (f"; only GPU <code>{html.escape(results.gpu)}</code>" if results.gpu else "")))
    rows.append(("files", "<br>".join(f"<code>{html.escape(str(f))}</code>" for f in results.files) or "-"))
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<table class="facts">{cells}</table>'


def _problems_html(problems: tuple[str, ...]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return (f'<section id="problems" class="problems"><h2>Problems ({len(problems)} line(s) skipped)</h2>'
            f"<ul>{items}</ul></section>")


def _page(title: str, body: str, with_plotly: bool) -> str:
    script = f'<script type="text/javascript">{get_plotlyjs()}</script>' if with_plotly else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>{script}</head>"
        f"<body>{body}</body></html>\n"
    )


def render(results: d.Results, configs_root: Path | None = None) -> str:
    """The page for ``results`` as an HTML string."""
    built = datetime.now(timezone.utc).isoformat(timespec="seconds")
    source = html.escape(str(results.source))
    if not results.records:
        where = f"{source} for GPU <code>{html.escape(results.gpu)}</code>" if results.gpu else source
        found = ""
        if results.gpu:
            others = sorted(d.gpus(d.load_results(results.source).records))
            found = f"<p>GPUs with results there: {html.escape(', '.join(others) or 'none')}.</p>"
        body = (f"<h1>Kernel workbench dashboard</h1><p class=\"note\">built {built}</p>"
                f'<p class="empty" id="no-results">No results found in {where}.</p>{found}'
                "<p>Run <code>kwb bench</code> or <code>kwb tune KERNEL --results DIR</code> on a GPU to produce some.</p>"
                + _problems_html(results.problems))
        return _page("Kernel workbench dashboard: no results", body, with_plotly=False)

    parts = [
        "<h1>Kernel workbench dashboard</h1>",
        f'<p class="note">built {built} from <code>{source}</code>; interactive: hover for exact numbers, '
        "drag to zoom, double-click to reset, dropdowns switch kernel / dtype / GPU or bucket</p>",
        _facts_table(results),
        _problems_html(results.problems),
    ]
    records = list(results.records)
    if not results.tuning:
        parts.append('<p class="note">No tuning lines (mode "tune"): run <code>kwb tune KERNEL --results DIR</code> '
                     "for the autotune views.</p>")
    if not results.measurements:
        parts.append('<p class="note">No benchmark measurements: run <code>kwb bench</code> for the roofline, '
                     "speed-up, per-GPU and telemetry views.</p>")
    for s in sections(records, configs_root):
        parts.append(
            f'<section id="section-{s.key}"><h2>{html.escape(s.title)}</h2><p class="caption">{html.escape(s.caption)}</p>'
            f"<figure>{figure_html(s.build(), s.key)}</figure></section>"
        )
    return _page("Kernel workbench dashboard", "".join(parts), with_plotly=True)


def write_report(results: d.Results, out_path: str | Path, configs_root: str | Path | None = None) -> Path:
    """Write the page for already loaded ``results`` to ``out_path`` atomically; returns the path."""
    page = render(results, Path(configs_root) if configs_root is not None else None)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def build_report(
    results_dir: str | Path, out_path: str | Path, gpu: str | None = None, configs_root: str | Path | None = None
) -> Path:
    """Write the dashboard for the results under ``results_dir`` to ``out_path``; returns the path.

    ``gpu`` keeps only lines of that GPU slug; ``configs_root`` is where the per-GPU config
    files are (default: the package's ``kernels/configs``).
    """
    return write_report(d.load_results(results_dir, gpu=gpu), out_path, configs_root)
