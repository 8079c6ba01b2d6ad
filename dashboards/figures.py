"""Plotly figure builders: each takes result records and returns a ``go.Figure``.

Every builder makes one *view* per kernel / dtype / GPU (or per tuning bucket) and, when
there is more than one, a dropdown that switches between them (``_assemble``). Hovers carry
the exact numbers; the formulas behind derived numbers live in :mod:`dashboards.data`.
Only SVG trace types are used (no WebGL), so the page renders in a headless browser without
a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.basedatatypes import BaseTraceType
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from dashboards import data as d
from profiling.floors import CEILINGS
from profiling.results import Record

TEMPLATE = "plotly_white"
OURS_COLOR = "#d62728"
_PALETTE = [c for c in qualitative.Plotly if c.upper() != "#EF553B"]  # red is ours
_STRATEGY_COLORS = {"exhaustive": "#636EFA", "local": "#FFA15A", "halving": "#00CC96"}
THROTTLED_COLOR = "#ff0000"

# 1-2-5 ticks on log axes, labelled with their full value (plotly's dtick="D2" labels the
# minor ticks with a bare leading digit: "5" for 500); ticks outside the axis range are not drawn
_LADDER = [m * 10.0**e for e in range(-4, 6) for m in (1, 2, 5)]
LOG_TICKS = {"tickvals": _LADDER, "ticktext": [f"{v:g}" for v in _LADDER]}


def provider_color(provider: str, providers: Sequence[str]) -> str:
    """Ours in red, each peer a fixed palette colour by its rank among ``providers``."""
    if provider == d.OURS:
        return OURS_COLOR
    peers = [p for p in d.provider_order(providers) if p != d.OURS]
    return _PALETTE[peers.index(provider) % len(_PALETTE)] if provider in peers else _PALETTE[0]


@dataclass
class View:
    """One switchable view: its traces (each with its subplot row) and the layout it sets.

    Every view of a figure must set the same ``layout`` keys, so switching back restores them.
    """

    label: str
    traces: list[tuple[BaseTraceType, int]] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    def add(self, trace: BaseTraceType, row: int = 1) -> None:
        self.traces.append((trace, row))


def _assemble(
    fig: go.Figure, views: Sequence[View], *, subplots: bool = False, menu_label: str = "", active: int = 0
) -> go.Figure:
    """Add every view's traces to ``fig``, show view ``active``, and a dropdown when there are several."""
    owner: list[int] = []
    for i, view in enumerate(views):
        for trace, row in view.traces:
            trace.visible = i == active
            fig.add_trace(trace, row=row, col=1) if subplots else fig.add_trace(trace)
            owner.append(i)
    fig.plotly_relayout(views[active].layout)
    if len(views) > 1:
        buttons = [
            dict(label=v.label, method="update", args=[{"visible": [o == i for o in owner]}, v.layout])
            for i, v in enumerate(views)
        ]
        fig.update_layout(
            updatemenus=[dict(buttons=buttons, active=active, direction="down", showactive=True,
                              x=1.0, xanchor="right", y=1.02, yanchor="bottom", pad=dict(t=0, r=0))],
        )
        if menu_label:  # above the dropdown, whatever the plot's height: shifted in pixels
            fig.add_annotation(text=menu_label, x=1.0, xref="paper", y=1.02, yref="paper", yshift=34, xanchor="right",
                               yanchor="bottom", showarrow=False, font=dict(size=11, color="#666"))
    return fig


def empty_figure(title: str, message: str, height: int = 260) -> go.Figure:
    """A figure that says there is nothing to show, and why."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_layout(template=TEMPLATE, title=title, height=height,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g} ms"


def _measurements(records: Sequence[Record]) -> list[Record]:
    return [r for r in d.latest(records) if r.mode != d.TUNE_MODE]


# ---------------------------------------------------------------- roofline
_ROOF_HOVER = (
    "<b>%{fullData.name}</b> %{customdata[0]}<br>time %{customdata[1]:.4f} ms (p20-p80 %{customdata[2]:.4f}-%{customdata[3]:.4f})"
    "<br>%{customdata[4]:.1f} GB/s, %{y:.2f} TFLOP/s at %{x:.1f} FLOP/byte"
    "<br>%{customdata[5]} of the roof here; floor %{customdata[6]}, time/floor %{customdata[7]}"
    "<br>config: %{customdata[8]}<br>%{customdata[9]}<extra></extra>"
)


def roofline(records: Sequence[Record], ceilings: Mapping[str, dict] = CEILINGS) -> go.Figure:
    """Roofline per kernel, dtype and GPU: achieved TFLOP/s against arithmetic intensity.

    Log-log. One point per shape and provider (the newest measurement of each) at
    x = flops / bytes, y = flops / time. The card's measured ceilings draw the roof: the
    bandwidth slope (copy TB/s x intensity) up to the ridge, then the flat bf16 matmul rate.
    A point's height under the roof is how far the kernel is from the card's limit at its
    intensity. Hover: time, p20-p80, GB/s, TFLOP/s, share of the roof, floor, config.
    """
    measured = [r for r in _measurements(records) if r.bytes and r.flops]
    if not measured:
        return empty_figure("Roofline", "no measurements with bytes and flops in the data")
    views = []
    for sel in d.selections(measured):
        rows = d.select(measured, sel.kernel, sel.dtype, sel.gpu)
        roof = d.ceilings_for_gpu(sel.gpu, ceilings)
        providers = [r.provider for r in rows]
        view = View(sel.label)
        for provider in d.provider_order(providers):
            points = sorted((r for r in rows if r.provider == provider), key=lambda r: (d.series_key(r), r.x_value))
            xs = [d.arithmetic_intensity(r.flops, r.bytes) for r in points]
            ys = [d.achieved_tflop_s(r.flops, r.median_ms) for r in points]
            custom = []
            for r, x, y in zip(points, xs, ys):
                floor = d.floor_ms(r, roof)
                custom.append([
                    d.shape_label(r.shape), r.median_ms, r.p20_ms, r.p80_ms, d.achieved_gb_s(r.bytes, r.median_ms),
                    f"{y / d.roof_tflop_s(x, roof):.0%}" if roof else "n/a (no ceilings)",
                    _ms(floor), f"{d.fraction_of_floor(r.median_ms, floor):.2f}x" if floor else "-",
                    d.config_label(r.config), r.date,
                ])
            view.add(go.Scatter(
                x=xs, y=ys, mode="markers", name=provider, customdata=custom, hovertemplate=_ROOF_HOVER,
                marker=dict(size=12 if provider == d.OURS else 10, color=provider_color(provider, providers),
                            line=dict(width=1, color="#333")),
            ))
        intensities = [d.arithmetic_intensity(r.flops, r.bytes) for r in rows]
        if roof:
            ridge = d.ridge_intensity(roof)
            lo, hi = min(intensities + [ridge]) / 4, max(intensities + [ridge]) * 4
            view.add(go.Scatter(
                x=[lo, ridge], y=[d.roof_tflop_s(lo, roof), d.roof_tflop_s(ridge, roof)], mode="lines",
                name=f"HBM {roof['copy_tb_s']:g} TB/s (measured copy)", line=dict(color="#555", width=2),
                hovertemplate="bandwidth roof: %{y:.1f} TFLOP/s at %{x:.1f} FLOP/byte<extra></extra>",
            ))
            view.add(go.Scatter(
                x=[ridge, hi], y=[roof["bf16_tflop_s"]] * 2, mode="lines",
                name=f"bf16 matmul {roof['bf16_tflop_s']:g} TFLOP/s (measured)", line=dict(color="#555", width=2, dash="dash"),
                hovertemplate="compute roof: %{y:.1f} TFLOP/s (ridge at " + f"{ridge:.0f}" + " FLOP/byte)<extra></extra>",
            ))
            note = f"ridge at {ridge:.0f} FLOP/byte"
        else:
            note = f"no measured ceilings for {sel.gpu} in profiling/floors.py: points only"
        view.layout = {"title.text": f"Roofline: {sel.label}<br><sup>{note}</sup>"}
        views.append(view)
    fig = go.Figure()
    fig.update_layout(
        template=TEMPLATE, height=520, margin=dict(t=110),
        xaxis=dict(type="log", **LOG_TICKS, title="arithmetic intensity (FLOP/byte)"),
        yaxis=dict(type="log", **LOG_TICKS, title="achieved TFLOP/s"),
        legend=dict(title="provider / ceiling"),
    )
    return _assemble(fig, views, menu_label="kernel · dtype · GPU")


# ---------------------------------------------------------------- speed-up and floor
def speedup_and_floor(records: Sequence[Record], ceilings: Mapping[str, dict] = CEILINGS) -> go.Figure:
    """Top: speed-up of ours over each peer against the swept dim (T / tokens), peer time /
    our time on the same shape (> 1: ours faster). Bottom: every provider's time as a
    multiple of the floor (1 = at the floor). One line per provider and fixed rest of the
    shape (e.g. B=1 H=64 D=128); log axes; hover with both times and both dates.
    """
    measured = _measurements(records)
    if not measured:
        return empty_figure("Speed-up and time / floor", "no measurements in the data")
    views = []
    for sel in d.selections(measured):
        rows = d.select(measured, sel.kernel, sel.dtype, sel.gpu)
        roof = d.ceilings_for_gpu(sel.gpu, ceilings)
        providers = [r.provider for r in rows]
        series = sorted({d.series_key(r) for r in rows})
        view = View(sel.label)
        for (peer, shape), pairs in d.group_by(d.speedups(rows), lambda s: (s.peer, d.series_key(s.ours))).items():
            pairs.sort(key=lambda s: s.ours.x_value)
            view.add(go.Scatter(
                x=[s.ours.x_value for s in pairs], y=[s.value for s in pairs], mode="lines+markers",
                name=f"ours vs {peer}" + (f" ({shape})" if len(series) > 1 else ""),
                legendgroup="speedup", legendgrouptitle_text="speed-up (top)",
                line=dict(color=provider_color(peer, providers)),
                customdata=[[d.shape_label(s.ours.shape), s.ours.median_ms, s.theirs.median_ms, s.ours.date, s.theirs.date]
                            for s in pairs],
                hovertemplate=("<b>%{y:.2f}x</b> vs " + peer + " at %{customdata[0]}<br>ours %{customdata[1]:.4f} ms ("
                               "%{customdata[3]})<br>" + peer + " %{customdata[2]:.4f} ms (%{customdata[4]})<extra></extra>"),
            ), row=1)
        with_floor = [(r, d.floor_ms(r, roof)) for r in rows]
        for (provider, shape), items in d.group_by(
            [(r, f) for r, f in with_floor if f], lambda item: (item[0].provider, d.series_key(item[0]))
        ).items():
            items.sort(key=lambda item: item[0].x_value)
            view.add(go.Scatter(
                x=[r.x_value for r, _ in items], y=[d.fraction_of_floor(r.median_ms, f) for r, f in items],
                mode="lines+markers", name=provider + (f" ({shape})" if len(series) > 1 else ""),
                legendgroup="floor", legendgrouptitle_text="time / floor (bottom)",
                line=dict(color=provider_color(provider, providers), dash="solid" if provider == d.OURS else "dot"),
                customdata=[[d.shape_label(r.shape), r.median_ms, f, r.p20_ms, r.p80_ms, d.config_label(r.config)] for r, f in items],
                hovertemplate=("<b>" + provider + "</b> %{customdata[0]}<br>%{customdata[1]:.4f} ms (p20-p80 %{customdata[3]:.4f}"
                               "-%{customdata[4]:.4f}) = <b>%{y:.2f}x</b> the floor %{customdata[2]:.4f} ms"
                               "<br>config: %{customdata[5]}<extra></extra>"),
            ), row=2)
        x_name = rows[0].x_name
        ticks = sorted({r.x_value for r in rows})
        view.layout = {
            "title.text": f"Speed-up vs peers and time / floor: {sel.label}",
            "xaxis.tickvals": ticks, "xaxis2.tickvals": ticks, "xaxis2.ticktext": [f"{t:g}" for t in ticks],
            "xaxis2.title.text": x_name,
        }
        views.append(view)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, subplot_titles=(
        "speed-up of ours = peer time / our time (same shape, > 1: ours faster)",
        "time / floor (floor = max(bytes / HBM rate, flops / matmul rate); 1 = at the floor)",
    ))
    fig.update_layout(template=TEMPLATE, height=720, margin=dict(t=110), legend=dict(groupclick="toggleitem"))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log", **LOG_TICKS, title_text="speed-up (x)", row=1, col=1)
    fig.update_yaxes(type="log", **LOG_TICKS, title_text="time / floor", row=2, col=1)
    for row in (1, 2):
        fig.add_hline(y=1, line=dict(color="#888", dash="dash", width=1), row=row, col=1)
    return _assemble(fig, views, subplots=True, menu_label="kernel · dtype · GPU")


# ---------------------------------------------------------------- autotune heatmap
def autotune_heatmap(
    records: Sequence[Record], x_axis: str = "BT", y_axis: str = "BV", configs_root: Path | None = None
) -> go.Figure:
    """Autotune heatmap: median time of every timed candidate over two config axes (default
    BT x BV), every other config field (num_warps, num_stages, ...) reduced by min, one view
    per tuning bucket (dropdown). Uses the run of the bucket that timed the most configs
    (the exhaustive one when there is one). A star marks the winner in the GPU's config file
    (``<configs_root>/<gpu>/<kernel>.json``; the tuning run's winner when the file has no
    entry for the bucket), an X the default config. Hover: the best config in each cell.
    """
    runs = d.tuning_runs(records)
    with_candidates = [t for t in runs if t.candidates]
    if not with_candidates:
        return empty_figure("Autotune heatmap", "no tuning candidates (mode 'tune') in the data")
    kernels_gpus = {(t.kernel, t.gpu) for t in with_candidates}
    files = {(k, g): d.config_winners(configs_root, k, g) for k, g in kernels_gpus}
    views, timed = [], []
    for (kernel, gpu, _), group in d.group_by(with_candidates, lambda t: (t.kernel, t.gpu, d.freeze(t.bucket))).items():
        run = max(group, key=lambda t: (t.configs_timed, t.strategy == "exhaustive"))
        axes = d.pick_axes(run.candidates, x_axis, y_axis)
        if axes is None:
            continue
        grid = d.config_grid(run.candidates, *axes)
        best = grid.min_ms
        others = sorted({k for c in run.candidates for k in c.config} - set(axes))
        custom = [
            [[d.config_label(cfg) if cfg else "-", n, (ms / best) if ms and best else None] for cfg, n, ms in zip(b, c, m)]
            for b, c, m in zip(grid.best, grid.count, grid.ms)
        ]
        label = d.bucket_label(run.bucket) + ("" if len(kernels_gpus) == 1 else f" · {kernel} · {gpu}")
        view = View(label)
        xs, ys = [str(x) for x in grid.xs], [str(y) for y in grid.ys]
        view.add(go.Heatmap(
            z=grid.ms, x=xs, y=ys, customdata=custom, colorscale="Viridis", reversescale=True,
            texttemplate="%{z:.3f}", colorbar=dict(title="ms"), showlegend=False, name="median ms",
            hovertemplate=(f"{axes[0]}=%{{x}} {axes[1]}=%{{y}}<br><b>%{{z:.4f}} ms</b> (%{{customdata[2]:.2f}}x the best cell)"
                           "<br>best of %{customdata[1]} timed: %{customdata[0]}<extra></extra>"),
        ))
        entries, source = files[(kernel, gpu)]
        entry = entries.get(d.freeze(run.bucket))
        if entry is not None:
            winner, where, winner_ms = entry["config"], f"config file {source}", entry.get("median_ms")
        elif run.winner is not None:
            winner, where, winner_ms = run.winner.config, f"{run.strategy} tuning run (not in the config file)", run.winner.median_ms
        else:
            winner = None
        if winner is not None and all(a in winner for a in axes):
            view.add(go.Scatter(
                x=[str(winner[axes[0]])], y=[str(winner[axes[1]])], mode="markers", name="winner",
                marker=dict(symbol="star-open", size=30, color="black", line=dict(width=2.5)),
                hovertemplate=(f"<b>winner</b> ({where})<br>{d.config_label(winner)}<br>{_ms(winner_ms)}<extra></extra>"),
            ))
        default = run.winner.extra.get("default_config") if run.winner else None
        if isinstance(default, dict) and all(a in default for a in axes):
            view.add(go.Scatter(
                x=[str(default[axes[0]])], y=[str(default[axes[1]])], mode="markers", name="default config",
                marker=dict(symbol="x", size=14, color="#ff4136", line=dict(color="white", width=1)),
                hovertemplate=(f"<b>default config</b><br>{d.config_label(default)}<br>"
                               f"{_ms(run.winner.extra.get('default_ms'))} in this run<extra></extra>"),
            ))
        warning = "" if all(d.timing_meaningful(c) for c in run.candidates) else "<b>TIMINGS MEANINGLESS (interpreter)</b>; "
        view.layout = {
            "title.text": (f"Autotune: {kernel} on {gpu}, bucket {d.bucket_label(run.bucket)}<br><sup>{warning}{run.strategy} run, "
                           f"{run.configs_timed} configs timed; min over {', '.join(others) or 'nothing'}</sup>"),
            "xaxis.categoryarray": xs, "yaxis.categoryarray": ys,
            "xaxis.title.text": axes[0], "yaxis.title.text": axes[1],
        }
        views.append(view)
        timed.append(run.configs_timed)
    if not views:
        return empty_figure("Autotune heatmap", "tuning candidates have fewer than two numeric config fields")
    fig = go.Figure()
    fig.update_layout(
        template=TEMPLATE, height=560, margin=dict(t=110),
        xaxis=dict(type="category", categoryorder="array"), yaxis=dict(type="category", categoryorder="array"),
        legend=dict(orientation="h", x=0, y=-0.15),
    )
    # open on the first bucket of the widest search (tiny test buckets have few valid configs)
    return _assemble(fig, views, menu_label="tuning bucket", active=timed.index(max(timed)))


# ---------------------------------------------------------------- strategy comparison
def strategy_comparison(records: Sequence[Record]) -> go.Figure:
    """Strategy comparison per tuning bucket: the best time each strategy found (with its
    p20-p80, and the default config's time for reference), how many candidates it tried, and
    its wall time. Exhaustive shows the best there is; a cheaper strategy should land within
    a few percent of it at a fraction of the candidates and seconds. One view per kernel and GPU.
    """
    runs = [t for t in d.tuning_runs(records) if t.winner is not None]
    if not runs:
        return empty_figure("Tuning strategies", "no tuning winners (provider 'tuned') in the data")
    views = []
    for (kernel, gpu), group in d.group_by(runs, lambda t: (t.kernel, t.gpu)).items():
        buckets = sorted({d.freeze(t.bucket): t.bucket for t in group}.values(), key=d.bucket_sort_key)
        constant = d.constant_fields(buckets)
        labels = {d.freeze(b): d.bucket_label(b, skip=constant) for b in buckets}
        order = [labels[d.freeze(b)] for b in buckets]
        best_of_bucket = {
            key: min(t.winner.median_ms for t in ts) for key, ts in d.group_by(group, lambda t: d.freeze(t.bucket)).items()
        }
        view = View(f"{kernel} · {gpu}")
        for strategy, ts in d.group_by(group, lambda t: t.strategy).items():
            ts.sort(key=lambda t: d.bucket_sort_key(t.bucket))
            x = [labels[d.freeze(t.bucket)] for t in ts]
            color = _STRATEGY_COLORS.get(strategy, "#AB63FA")
            wins = [t.winner for t in ts]
            view.add(go.Bar(
                x=x, y=[w.median_ms for w in wins], name=strategy, legendgroup=strategy, marker_color=color,
                error_y=dict(type="data", symmetric=False, array=[w.p80_ms - w.median_ms for w in wins],
                             arrayminus=[w.median_ms - w.p20_ms for w in wins]),
                customdata=[[d.config_label(w.config), w.median_ms / best_of_bucket[d.freeze(t.bucket)], w.p20_ms, w.p80_ms]
                            for t, w in zip(ts, wins)],
                hovertemplate=(f"<b>{strategy}</b> %{{x}}<br>best found %{{y:.4f}} ms (p20-p80 %{{customdata[2]:.4f}}-"
                               "%{customdata[3]:.4f})<br>%{customdata[1]:.3f}x the best of all strategies"
                               "<br>config: %{customdata[0]}<extra></extra>"),
            ), row=1)
            tried = [w.extra.get("candidates_tried", t.configs_timed) for t, w in zip(ts, wins)]
            valid = [w.extra.get("candidates_valid", "?") for w in wins]
            view.add(go.Bar(
                x=x, y=tried, name=strategy, legendgroup=strategy, showlegend=False, marker_color=color,
                customdata=valid, hovertemplate=f"<b>{strategy}</b> %{{x}}<br>%{{y}} tried of %{{customdata}} valid<extra></extra>",
            ), row=2)
            view.add(go.Bar(
                x=x, y=[w.extra.get("bucket_wall_s") for w in wins], name=strategy, legendgroup=strategy,
                showlegend=False, marker_color=color, customdata=[w.extra.get("run_wall_s", "?") for w in wins],
                hovertemplate=(f"<b>{strategy}</b> %{{x}}<br>%{{y:.1f}} s for this bucket"
                               "<br>%{customdata} s for the whole run<extra></extra>"),
            ), row=3)
        defaults = {}
        for t in group:  # the default config's time, from the exhaustive run when there is one
            ms = t.winner.extra.get("default_ms")
            key = labels[d.freeze(t.bucket)]
            if isinstance(ms, (int, float)) and (key not in defaults or t.strategy == "exhaustive"):
                defaults[key] = (ms, d.config_label(t.winner.extra.get("default_config") or {}), t.strategy)
        if defaults:
            xs = [k for k in order if k in defaults]
            view.add(go.Scatter(
                x=xs, y=[defaults[k][0] for k in xs], mode="markers", name="default config",
                marker=dict(symbol="x", size=11, color="#222"), customdata=[defaults[k][1:] for k in xs],
                hovertemplate=("<b>default config</b> %{x}<br>%{y:.4f} ms (%{customdata[1]} run)"
                               "<br>%{customdata[0]}<extra></extra>"),
            ), row=1)
        view.layout = {
            "title.text": f"Tuning strategies: {kernel} on {gpu}"
            + ("" if all(d.timing_meaningful(t.winner) for t in group) else " <b>(TIMINGS MEANINGLESS: interpreter)</b>")
            + (f"<br><sup>every bucket: {d.bucket_label({k: buckets[0][k] for k in constant})}</sup>" if constant else ""),
            "xaxis.categoryarray": order, "xaxis2.categoryarray": order, "xaxis3.categoryarray": order,
        }
        views.append(view)
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=(
        "best time found (ms, p20-p80 bars; x = default config)", "candidates tried", "wall time for the bucket (s)",
    ))
    fig.update_layout(template=TEMPLATE, height=780, barmode="group", margin=dict(t=110))
    fig.update_xaxes(type="category", categoryorder="array")
    fig.update_yaxes(type="log", title_text="ms", row=1, col=1)
    fig.update_yaxes(title_text="candidates", row=2, col=1)
    fig.update_yaxes(title_text="s", row=3, col=1)
    return _assemble(fig, views, subplots=True, menu_label="kernel · GPU")


# ---------------------------------------------------------------- per-GPU comparison
def gpu_comparison(records: Sequence[Record], ceilings: Mapping[str, dict] = CEILINGS) -> go.Figure:
    """Per-GPU comparison: median time of each shape, one bar per GPU slug (p20-p80 error
    bars), one view per kernel, dtype and provider. The title says "one GPU type in the data"
    when the results come from a single card: the bars compare cards once another card's
    results are committed. Hover: GB/s and time / floor on that card, driver, date.
    """
    measured = _measurements(records)
    if not measured:
        return empty_figure("Per-GPU comparison", "no measurements in the data")
    slugs = sorted({d.gpu_slug(r) for r in measured})
    note = (f"one GPU type in the data ({slugs[0]}): add results from another card to compare"
            if len(slugs) == 1 else f"{len(slugs)} GPU types: {', '.join(slugs)}")
    views = []
    keyed = d.group_by(measured, lambda r: (r.kernel, d.canonical_dtype(r.dtype), r.provider))
    for kernel, dtype, provider in sorted(keyed, key=lambda k: (k[0], k[1], k[2] != d.OURS, k[2])):
        rows = keyed[(kernel, dtype, provider)]
        shapes = sorted({d.freeze(r.shape): r.shape for r in rows}.values(), key=d.shape_label)
        constant = d.constant_fields(shapes) | {"dtype"}
        order_rows = sorted(rows, key=lambda r: (d.series_key(r), r.x_value))
        order = list(dict.fromkeys(d.shape_label(r.shape, skip=constant) for r in order_rows))
        view = View(f"{kernel} · {dtype} · {provider}")
        for i, slug in enumerate(slugs):
            mine = [r for r in order_rows if d.gpu_slug(r) == slug]
            if not mine:
                continue
            roof = d.ceilings_for_gpu(slug, ceilings)
            custom = []
            for r in mine:
                floor = d.floor_ms(r, roof)
                custom.append([
                    r.gpu.get("name", "?"), r.gpu.get("driver", "?"), r.p20_ms, r.p80_ms,
                    f"{d.achieved_gb_s(r.bytes, r.median_ms):.1f} GB/s" if r.bytes else "-",
                    f"{d.fraction_of_floor(r.median_ms, floor):.2f}x the floor" if floor else "no floor", r.date,
                ])
            view.add(go.Bar(
                x=[d.shape_label(r.shape, skip=constant) for r in mine], y=[r.median_ms for r in mine], name=slug,
                marker_color=_PALETTE[i % len(_PALETTE)], customdata=custom,
                error_y=dict(type="data", symmetric=False, array=[r.p80_ms - r.median_ms for r in mine],
                             arrayminus=[r.median_ms - r.p20_ms for r in mine]),
                hovertemplate=("<b>%{customdata[0]}</b> (driver %{customdata[1]})<br>%{x}: <b>%{y:.4f} ms</b> "
                               "(p20-p80 %{customdata[2]:.4f}-%{customdata[3]:.4f})<br>%{customdata[4]}, %{customdata[5]}"
                               "<br>%{customdata[6]}<extra></extra>"),
            ))
        fixed = d.shape_label({k: shapes[0][k] for k in constant if k in shapes[0]})
        view.layout = {
            "title.text": f"Per GPU: {kernel} · {dtype} · {provider}" + (f" ({fixed})" if fixed else "") + f"<br><sup>{note}</sup>",
            "xaxis.categoryarray": order,
        }
        views.append(view)
    fig = go.Figure()
    fig.update_layout(
        template=TEMPLATE, height=480, barmode="group", margin=dict(t=110),
        xaxis=dict(type="category", categoryorder="array", title="shape"),
        yaxis=dict(type="log", title="median time (ms)"), legend=dict(title="GPU"),
    )
    return _assemble(fig, views, menu_label="kernel · dtype · provider")


# ---------------------------------------------------------------- telemetry
_TELEMETRY_ROWS = (
    ("sm_clock_mhz", "SM clock (MHz)"),
    ("power_w", "power (W)"),
    ("temp_c", "temperature (C)"),
)


def telemetry(records: Sequence[Record]) -> go.Figure:
    """Telemetry beside timings: for every measurement (in file order, newest last), its
    median time with p20-p80 (top), then the SM clock, power and temperature read while it
    ran: the median with min-max bars. A measurement whose clocks were slowed by something
    other than idleness (power cap, thermal, ...) gets a red ring; hover lists the reasons
    and how many readings the summary is over. One view per kernel, dtype and GPU.
    """
    measured = [r for r in records if r.mode != d.TUNE_MODE]
    if not measured:
        return empty_figure("Telemetry", "no measurements in the data")
    views = []
    for sel in d.selections(measured):
        rows = d.select(measured, sel.kernel, sel.dtype, sel.gpu)
        providers = [r.provider for r in rows]
        shapes = [r.shape for r in rows]
        constant = d.constant_fields(shapes) | {"dtype"}
        ticks = [f"{r.provider} {d.shape_label(r.shape, skip=constant)}" for r in rows]
        view = View(sel.label)
        for provider in d.provider_order(providers):
            index = [i for i, r in enumerate(rows) if r.provider == provider]
            mine = [rows[i] for i in index]
            color = provider_color(provider, providers)
            ring = dict(color=[THROTTLED_COLOR if d.throttled(r.telemetry) else color for r in mine],
                        width=[3 if d.throttled(r.telemetry) else 0 for r in mine])
            hover = [_telemetry_hover(r) for r in mine]
            view.add(go.Scatter(
                x=index, y=[r.median_ms for r in mine], mode="markers", name=provider, legendgroup=provider,
                marker=dict(color=color, size=10, line=ring), customdata=hover,
                error_y=dict(type="data", symmetric=False, array=[r.p80_ms - r.median_ms for r in mine],
                             arrayminus=[r.median_ms - r.p20_ms for r in mine]),
                hovertemplate="<b>%{y:.4f} ms</b><br>%{customdata}<extra></extra>",
            ), row=1)
            for row, (name, title) in enumerate(_TELEMETRY_ROWS, start=2):
                stats = [d.telemetry_stat(r.telemetry, name) for r in mine]
                view.add(go.Scatter(
                    x=index, y=[s.median if s else None for s in stats], mode="markers", name=provider,
                    legendgroup=provider, showlegend=False, marker=dict(color=color, size=9, line=ring),
                    error_y=dict(type="data", symmetric=False, array=[s.max - s.median if s else None for s in stats],
                                 arrayminus=[s.median - s.min if s else None for s in stats]),
                    customdata=[[f"{s.min:g} / {s.median:g} / {s.max:g}" if s else "not recorded", h] for s, h in zip(stats, hover)],
                    hovertemplate=f"<b>{title}</b> min / median / max: %{{customdata[0]}}<br>%{{customdata[1]}}<extra></extra>",
                ), row=row)
        tickvals = list(range(len(rows)))
        view.layout = {"title.text": f"Telemetry beside timings: {sel.label}", "xaxis4.tickvals": tickvals, "xaxis4.ticktext": ticks}
        views.append(view)
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=("median time (p20-p80)",) + tuple(t for _, t in _TELEMETRY_ROWS))
    fig.update_layout(template=TEMPLATE, height=900, margin=dict(t=110, b=150), legend=dict(title="provider"))
    fig.update_yaxes(type="log", title_text="ms", row=1, col=1)
    for row, (_, title) in enumerate(_TELEMETRY_ROWS, start=2):
        fig.update_yaxes(title_text=title.split(" (")[-1].rstrip(")"), row=row, col=1)
    fig.update_xaxes(zeroline=False)
    fig.update_xaxes(tickangle=-35, row=4, col=1)
    return _assemble(fig, views, subplots=True, menu_label="kernel · dtype · GPU")


def _telemetry_hover(r: Record) -> str:
    reasons = d.throttle_reasons(r.telemetry)
    samples = d.telemetry_samples(r.telemetry)
    mem = d.telemetry_stat(r.telemetry, "mem_clock_mhz")
    parts = [
        f"{r.provider} {d.shape_label(r.shape)}",
        f"p20-p80 {r.p20_ms:.4f}-{r.p80_ms:.4f} ms",
        ("no telemetry" if samples == 0 else "1 reading" if samples == 1 else f"{samples} readings")
        + (f", memory clock {mem.median:g} MHz" if mem else ""),
        ("<b>THROTTLED</b>: " if d.throttled(r.telemetry) else "clock events: ") + (", ".join(reasons) or "none"),
        r.date,
    ]
    return "<br>".join(parts)
