"""Interactive performance dashboards: one self-contained HTML file built from ``results/``.

``data`` loads the JSON lines (schema of :mod:`profiling.results`), groups them and computes
the derived metrics; ``figures`` turns them into plotly figures; ``report`` writes the page
(plotly.js embedded once, no CDN, no server). ``kwb dashboard`` is the command.
"""
from dashboards.report import build_report

__all__ = ["build_report"]
