"""dashboards/: loading, derived metrics, figure builders and the HTML report, on small
synthetic result files written to tmp_path (CPU only, no browser)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import triton
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from dashboards import build_report
from dashboards import data as d
from dashboards import figures
from profiling.results import Record

GPU = {"name": "Test GPU 80GB", "slug": "test-gpu", "driver": "1.0"}
CEILINGS = {"test-gpu": {"copy_tb_s": 2.0, "bf16_tflop_s": 500.0}}
BUCKET = {"D": 64, "E": 64, "dtype": "bfloat16", "T": 4096}


def make_record(**overrides) -> Record:
    fields = dict(
        kernel="lightning_attn_fwd", provider="ours", mode="fwd", shape={"B": 1, "T": 4096, "H": 8, "D": 64, "E": 64},
        dtype="bfloat16", config={"BT": 64, "BV": 64}, median_ms=2.0, p20_ms=1.9, p80_ms=2.2, floor_ms=1.0,
        bytes=2 * 10**9, flops=10**12, x_name="T", x_value=4096, gpu=GPU, versions={"torch": "2.11.0", "triton": "3.6.0"},
        telemetry={"samples": 5, "sm_clock_mhz": {"min": 1500, "median": 1900, "max": 1980},
                   "power_w": {"min": 300.0, "median": 400.0, "max": 450.0}, "temp_c": {"min": 40, "median": 45, "max": 50},
                   "throttle_reasons": []},
        date="2026-01-01T00:00:00+00:00",
    )
    fields.update(overrides)
    return Record(**fields)


def at(T: int, **overrides) -> Record:
    """A measurement at sequence length T: bytes and flops scale with T."""
    scale = T // 4096
    fields = dict(shape={"B": 1, "T": T, "H": 8, "D": 64, "E": 64}, x_value=T, bytes=2 * 10**9 * scale,
                  flops=10**12 * scale, floor_ms=1.0 * scale)
    fields.update(overrides)
    return make_record(**fields)


def candidate(BT: int, BV: int, num_warps: int, ms: float, strategy: str = "exhaustive", bucket=BUCKET) -> Record:
    return make_record(
        provider="candidate", mode="tune", dtype="bf16", config={"BT": BT, "BV": BV, "num_warps": num_warps},
        median_ms=ms, p20_ms=ms * 0.99, p80_ms=ms * 1.01, floor_ms=None, flops=None,
        extra={"strategy": strategy, "bucket": bucket},
    )


def tuned(config: dict, ms: float, strategy: str, tried: int, wall_s: float, bucket=BUCKET) -> Record:
    return make_record(
        provider="tuned", mode="tune", dtype="bf16", config=config, median_ms=ms, p20_ms=ms * 0.99, p80_ms=ms * 1.01,
        floor_ms=None, flops=None,
        extra={"strategy": strategy, "bucket": bucket, "candidates_valid": 8, "candidates_tried": tried,
               "bucket_wall_s": wall_s, "run_wall_s": wall_s + 1, "default_config": {"BT": 32, "BV": 16, "num_warps": 4},
               "default_ms": 0.5},
    )


def tuning_records() -> list[Record]:
    timings = {(32, 16): (0.5, 0.45), (32, 32): (0.4, 0.42), (64, 16): (0.3, 0.35), (64, 32): (0.25, 0.2)}
    out = [candidate(BT, BV, w, ms) for (BT, BV), pair in timings.items() for w, ms in zip((4, 8), pair)]
    out += [candidate(64, 32, 8, 0.21, "local"), candidate(64, 16, 4, 0.3, "local")]
    out += [tuned({"BT": 64, "BV": 32, "num_warps": 8}, 0.2, "exhaustive", 8, 10.0),
            tuned({"BT": 64, "BV": 32, "num_warps": 8}, 0.21, "local", 2, 3.0)]
    return out


def write_jsonl(path: Path, lines: list) -> Path:
    """Records as schema lines; strings written as they are (for malformed input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else line.to_json()) + "\n" for line in lines))
    return path


def visible(fig) -> list:
    return [t for t in fig.data if t.visible is not False]


# ---------------------------------------------------------------- data
def test_metric_formulas():
    assert d.achieved_gb_s(2 * 10**9, 1.0) == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert d.achieved_tflop_s(10**12, 2.0) == pytest.approx(500.0)  # 1 TFLOP in 2 ms
    assert d.arithmetic_intensity(10**12, 2 * 10**9) == pytest.approx(500.0)
    assert d.fraction_of_floor(1.5, 1.0) == pytest.approx(1.5)
    assert d.speedup(peer_ms=3.0, ours_ms=1.5) == pytest.approx(2.0)
    roof = CEILINGS["test-gpu"]
    assert d.ridge_intensity(roof) == pytest.approx(250.0)
    assert d.roof_tflop_s(100.0, roof) == pytest.approx(200.0)  # on the bandwidth slope
    assert d.roof_tflop_s(1000.0, roof) == pytest.approx(500.0)  # on the compute roof
    # floor from bytes and flops when the line has none: max(2 GB / 2 TB/s, 1 TFLOP / 500 TFLOP/s) = 2 ms
    assert d.floor_ms(make_record(floor_ms=None), roof) == pytest.approx(2.0)


def test_malformed_and_empty_lines_are_reported_with_file_and_line_and_skipped(tmp_path):
    good = make_record()
    path = write_jsonl(tmp_path / "r.jsonl", [good, "", "{not json", "{}", json.dumps({**asdict(good), "median_ms": "fast"}), good])
    results = d.load_results(tmp_path)
    assert len(results.records) == 2
    assert [p.split(": ")[0] for p in results.problems] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "empty line" in results.problems[0]
    assert "malformed JSON" in results.problems[1]
    assert "missing field" in results.problems[2]
    assert "median_ms" in results.problems[3]


def test_folder_reading_skips_raw_logs_and_filters_by_gpu(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [make_record(), make_record(gpu={"name": "Other", "slug": "other", "driver": "2"})])
    write_jsonl(tmp_path / "h200" / "b.jsonl", [make_record(provider="fla")])
    write_jsonl(tmp_path / "raw" / "log.jsonl", ["not a schema line"])
    results = d.load_results(tmp_path)
    assert [f.name for f in results.files] == ["a.jsonl", "b.jsonl"]
    assert len(results.records) == 3 and not results.problems
    assert {d.gpu_slug(r) for r in d.load_results(tmp_path, gpu="other").records} == {"other"}
    assert list(d.load_results(tmp_path / "missing").problems) == [f"{tmp_path / 'missing'}: no such file or folder"]


def test_grouping_normalises_dtype_and_keeps_the_newest_measurement():
    old = make_record(median_ms=3.0, date="2026-01-01T00:00:00+00:00")
    new = make_record(median_ms=2.5, date="2026-01-02T00:00:00+00:00", dtype="bf16")
    assert d.selections([old, new]) == [d.Selection("lightning_attn_fwd", "bf16", "test-gpu")]
    assert [r.median_ms for r in d.latest([new, old])] == [2.5]
    assert d.bucket_label(BUCKET) == "D=64 E=64 T=4096 bf16"


def test_telemetry_summary_and_single_reading():
    sampled = make_record().telemetry
    assert d.telemetry_stat(sampled, "sm_clock_mhz") == d.Stat(1500, 1900, 1980)
    single = {"sm_clock_mhz": 1980, "power_w": 175.0, "throttle_reasons": ["gpu_idle"]}
    assert d.telemetry_stat(single, "power_w") == d.Stat(175.0, 175.0, 175.0)
    assert d.telemetry_stat({}, "power_w") is None
    assert not d.throttled(single)
    assert d.throttled({"throttle_reasons": ["sw_power_cap"]})
    assert d.telemetry_samples(single) == 1 and d.telemetry_samples(sampled) == 5


# ---------------------------------------------------------------- figures
def test_roofline_points_and_ceilings():
    records = [at(4096), at(16384, median_ms=6.0), at(4096, provider="fla", median_ms=4.0)]
    fig = figures.roofline(records, ceilings=CEILINGS)
    names = [t.name for t in fig.data]
    assert names[:2] == ["ours", "fla"]  # ours first
    assert any("2 TB/s" in n for n in names) and any("500 TFLOP/s" in n for n in names)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert fig.layout.xaxis.title.text == "arithmetic intensity (FLOP/byte)"
    assert fig.layout.yaxis.title.text == "achieved TFLOP/s"
    ours = fig.data[0]
    # y = flops / time: 1e12 FLOP in 2 ms = 500 TFLOP/s; 4e12 in 6 ms = 666.7; x = flops / bytes = 500
    assert list(ours.y) == pytest.approx([500.0, 4e12 / 6e-3 / 1e12])
    assert list(ours.x) == pytest.approx([500.0, 500.0])
    assert ours.customdata[0][4] == pytest.approx(1000.0)  # GB/s = 2e9 B / 2 ms
    slope, flat = fig.data[2], fig.data[3]
    assert slope.x[-1] == pytest.approx(250.0) and slope.y[-1] == pytest.approx(500.0)  # the ridge
    assert list(flat.y) == [500.0, 500.0]
    assert not fig.layout.updatemenus  # one kernel / dtype / GPU: no dropdown


def test_roofline_without_ceilings_shows_points_only():
    fig = figures.roofline([make_record()], ceilings={})
    assert [t.name for t in fig.data] == ["ours"]
    assert "no measured ceilings for test-gpu" in fig.layout.title.text


def test_dropdown_switches_between_kernels():
    records = [make_record(), make_record(kernel="lightning_attn_bwd"), make_record(kernel="lightning_attn_bwd", provider="fla")]
    fig = figures.roofline(records, ceilings=CEILINGS)
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == ["lightning_attn_bwd · bf16 · test-gpu", "lightning_attn_fwd · bf16 · test-gpu"]
    masks = [b.args[0]["visible"] for b in menu.buttons]
    assert all(len(m) == len(fig.data) for m in masks)
    assert [sum(m) for m in masks] == [4, 3]  # ours + fla + 2 ceiling lines; ours + 2 ceiling lines
    assert [t.visible for t in fig.data] == masks[0]
    assert "lightning_attn_fwd" in menu.buttons[1].args[1]["title.text"]


def test_speedup_is_peer_over_ours_and_floor_fraction_is_median_over_floor():
    records = [at(4096), at(16384, median_ms=8.0), at(4096, provider="fla", median_ms=5.0),
               at(16384, provider="fla", median_ms=12.0), at(65536, provider="fla", median_ms=40.0)]
    fig = figures.speedup_and_floor(records, ceilings=CEILINGS)
    by_name = {t.name: t for t in fig.data}
    speedup = by_name["ours vs fla"]
    assert list(speedup.x) == [4096, 16384]  # only shapes both measured
    assert list(speedup.y) == pytest.approx([5.0 / 2.0, 12.0 / 8.0])
    assert speedup.yaxis == "y" and by_name["fla"].yaxis == "y2"
    assert list(by_name["fla"].y) == pytest.approx([5.0 / 1.0, 12.0 / 4.0, 40.0 / 16.0])
    assert list(by_name["ours"].y) == pytest.approx([2.0, 2.0])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.layout.xaxis2.title.text == "T"


def test_committed_measurements_sweep_a_field_of_their_shape():
    """A line over x is one shape without its swept field (``series_key`` drops ``x_name``):
    an x_name that is not a shape field (the MoE lines once said "tokens") splits every line
    into single points, one legend entry each."""
    results = d.load_results(Path(__file__).resolve().parents[2] / "results")
    measured = results.measurements  # tuning lines are drawn by bucket, not as lines over x
    assert measured
    wrong = sorted({(r.kernel, r.x_name) for r in measured if r.x_name not in r.shape})
    assert not wrong, wrong


def write_config_file(root: Path, entries: list[dict]) -> Path:
    path = root / "test-gpu" / "lightning_attn_fwd.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kernel": "lightning_attn_fwd", "meta": {"triton": triton.__version__}, "entries": entries}))
    return root


def test_heatmap_reduces_by_min_and_marks_the_config_file_winner(tmp_path):
    root = write_config_file(tmp_path, [{"key": BUCKET, "config": {"BT": 64, "BV": 16, "num_warps": 4}, "median_ms": 0.3}])
    fig = figures.autotune_heatmap(tuning_records(), configs_root=root)
    heat, star, default = fig.data
    assert heat.type == "heatmap"
    assert list(heat.x) == ["32", "64"] and list(heat.y) == ["16", "32"]
    # the exhaustive run (8 configs) is drawn; each cell is the min over num_warps
    assert [list(row) for row in heat.z] == [[0.45, 0.3], [0.4, 0.2]]
    assert heat.customdata[1][1][0] == "BT=64 BV=32 num_warps=8"
    assert (star.name, star.x, star.y) == ("winner", ("64",), ("16",))  # the file's winner, not the fastest cell
    assert "config file" in star.hovertemplate
    assert (default.name, default.x, default.y) == ("default config", ("32",), ("16",))
    assert fig.layout.xaxis.title.text == "BT" and fig.layout.yaxis.title.text == "BV"
    assert fig.layout.xaxis.type == "category"


def test_heatmap_without_config_file_marks_the_run_winner_and_switches_buckets(tmp_path):
    other = {**BUCKET, "T": 8192}
    records = tuning_records() + [candidate(32, 16, 4, 0.9, bucket=other), candidate(64, 16, 4, 0.8, bucket=other)]
    fig = figures.autotune_heatmap(records, configs_root=tmp_path, x_axis="BV", y_axis="BT")
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == ["D=64 E=64 T=4096 bf16", "D=64 E=64 T=8192 bf16"]
    assert menu.active == 0  # the bucket with the most configs timed
    star = next(t for t in visible(fig) if t.name == "winner")
    assert (star.x, star.y) == (("32",), ("64",))  # axes swapped on request
    assert "tuning run" in star.hovertemplate
    assert menu.buttons[1].args[1]["yaxis.categoryarray"] == ["32", "64"]


def test_strategy_comparison_bars():
    fig = figures.strategy_comparison(tuning_records())
    bars = {(t.name, t.yaxis): t for t in fig.data if t.type == "bar"}
    assert list(bars[("exhaustive", "y")].y) == [0.2] and list(bars[("local", "y")].y) == [0.21]
    assert list(bars[("exhaustive", "y2")].y) == [8] and list(bars[("local", "y2")].y) == [2]
    assert list(bars[("exhaustive", "y3")].y) == [10.0] and list(bars[("local", "y3")].y) == [3.0]
    assert bars[("local", "y")].customdata[0][1] == pytest.approx(0.21 / 0.2)  # x the best of all strategies
    default = next(t for t in fig.data if t.name == "default config")
    assert list(default.y) == [0.5]


def test_gpu_comparison_says_when_there_is_one_gpu_type():
    fig = figures.gpu_comparison([at(4096), at(16384)])
    assert "one GPU type in the data (test-gpu)" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["test-gpu"]
    assert list(fig.data[0].x) == ["T=4096", "T=16384"]

    h200 = {"name": "H200", "slug": "h200", "driver": "1"}
    fig = figures.gpu_comparison([at(4096), at(4096, gpu=h200, median_ms=1.5)])
    assert "2 GPU types" in fig.layout.title.text
    assert [(t.name, list(t.y)) for t in fig.data] == [("h200", [1.5]), ("test-gpu", [2.0])]


def test_telemetry_beside_timings():
    single = {"sm_clock_mhz": 1200, "power_w": 700.0, "temp_c": 80, "throttle_reasons": ["sw_power_cap"]}
    records = [at(4096), at(16384, provider="fla", telemetry=single)]
    fig = figures.telemetry(records)
    assert len(fig.data) == 2 * 4  # two providers x (time, SM clock, power, temperature)
    ours_clock = next(t for t in fig.data if t.name == "ours" and t.yaxis == "y2")
    assert list(ours_clock.y) == [1900.0]
    assert list(ours_clock.error_y.array) == [80.0] and list(ours_clock.error_y.arrayminus) == [400.0]
    fla_time = next(t for t in fig.data if t.name == "fla" and t.yaxis == "y")
    assert list(fla_time.x) == [1] and list(fla_time.y) == [2.0]
    assert "THROTTLED" in fla_time.customdata[0] and "sw_power_cap" in fla_time.customdata[0]
    assert list(fla_time.marker.line.color) == [figures.THROTTLED_COLOR]
    assert list(fig.layout.xaxis4.ticktext) == ["ours T=4096", "fla T=16384"]


def test_interpreter_timings_are_flagged():
    records = [candidate(32, 16, 4, 1.0), candidate(64, 16, 4, 2.0)]
    records = [Record(**{**asdict(r), "extra": {**r.extra, "timing_meaningful": False}}) for r in records]
    assert "TIMINGS MEANINGLESS" in figures.autotune_heatmap(records).layout.title.text
    assert "MEANINGLESS" not in figures.autotune_heatmap(tuning_records()).layout.title.text


def test_builders_say_when_there_is_nothing_to_show():
    assert "no tuning candidates" in figures.autotune_heatmap([make_record()]).layout.annotations[0].text
    assert "no measurements" in figures.telemetry(tuning_records()).layout.annotations[0].text


# ---------------------------------------------------------------- report
def test_report_is_self_contained_with_plotly_js_once(tmp_path):
    write_jsonl(tmp_path / "results" / "bench.jsonl", [at(4096), at(4096, provider="fla", median_ms=3.0), "{oops"])
    write_jsonl(tmp_path / "results" / "tune.jsonl", tuning_records())
    out = build_report(tmp_path / "results", tmp_path / "out" / "report.html")
    page = out.read_text()
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js) == 1
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    rest = page.replace(plotly_js, "")  # the bundle itself names a topojson URL it never fetches here
    assert "cdn.plot.ly" not in rest and "http://" not in rest and "https://" not in rest
    for key in ("roofline", "speedup", "heatmap", "strategies", "gpus", "telemetry"):
        assert f'id="section-{key}"' in page and f'id="{key}"' in page
    assert f"{tmp_path / 'results' / 'bench.jsonl'}:3: malformed JSON" in page
    assert "test-gpu" in page and "torch 2.11.0" in page and "<td>14 (2 measurements, 12 tuning lines)" in page


def test_report_of_an_empty_folder_says_so(tmp_path):
    (tmp_path / "results").mkdir()
    page = build_report(tmp_path / "results", tmp_path / "report.html").read_text()
    assert f"No results found in {tmp_path / 'results'}" in page
    assert "Plotly.newPlot" not in page


def test_report_for_another_gpu_lists_the_gpus_there(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [make_record()])
    page = build_report(tmp_path, tmp_path / "report.html", gpu="nvidia-h200").read_text()
    assert "No results found in" in page and "nvidia-h200" in page and "test-gpu" in page


def test_kwb_dashboard_command(tmp_path):
    from autotune.cli import app

    write_jsonl(tmp_path / "results" / "r.jsonl", [make_record(), ""])
    out = tmp_path / "dash.html"
    result = CliRunner().invoke(app, ["dashboard", "-o", str(out), "--results", str(tmp_path / "results")])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote" in result.output and "empty line" in result.output
    missing = CliRunner().invoke(app, ["dashboard", "-o", str(out), "--results", str(tmp_path / "nope")])
    assert missing.exit_code == 2
