"""``kwb`` (and ``python -m autotune``): tune kernels, show which tuned configs apply.

    kwb tune lightning_attn_fwd --shapes minimax --strategy local
    kwb tune all --shapes "T=4096,H=64,D=128;T=8192,H=64,D=128"
    kwb tune lightning_attn_fwd --shapes small --interpret --out-dir /tmp/configs
    kwb info

Nothing that imports triton (the runner, the tunables, the writer) is imported at module
level: triton reads ``TRITON_INTERPRET`` when it is imported (its own ``@jit`` library
functions are built then), so ``--interpret`` has to set it first.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from autotune.result import Result
from autotune.strategies import STRATEGIES
from autotune.tunable import Tunable, shape_label

if TYPE_CHECKING:
    from autotune.runner import BucketResult, Job, TuneRun, Tuner

app = typer.Typer(
    help="Kernel workbench: tune kernels on this GPU and inspect the tuned configs.",
    no_args_is_help=True,
    add_completion=False,
)

MAX_INTERPRET_BYTES = 1 << 20  # the interpreter takes seconds per launch even at ~100 KB
GPU_REP_MS = 100.0
INTERPRET_REP_MS = 1.0  # one timed launch: interpreter timings mean nothing anyway
GPU_CONFIRM_ROUNDS = 3  # the finalists' re-timing rounds (autotune.runner.Tuner)
MEANINGLESS = "TIMINGS ARE MEANINGLESS: Triton interpreter on the CPU; this run only exercises the tuning pipeline"


def _label(mapping: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in mapping.items())


def _use_interpreter() -> None:
    """Route Triton launches through the interpreter; only works before triton is imported."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise typer.BadParameter("--interpret needs TRITON_INTERPRET=1 set before triton is imported (set it in the environment)")
    os.environ["TRITON_INTERPRET"] = "1"


class _ProgressReporter:
    """Candidates done / planned over all buckets, the bucket's best so far, elapsed and ETA."""

    def __init__(self, progress: Progress, kernel: str, total: int, on_bucket: Callable[[BucketResult], None]) -> None:
        self.progress = progress
        self.kernel = kernel
        self.on_bucket = on_bucket
        self.task = progress.add_task(kernel, total=total, best="-")
        self._planned = self._done = 0

    def bucket_started(self, job: Job, planned: int) -> None:
        self._planned, self._done = planned, 0
        self.progress.update(self.task, description=f"{self.kernel} [dim]{_label(job.key)}[/]", best="-")

    def measured(self, result: Result, best: Result | None) -> None:
        self._done += 1
        best_text = "-" if best is None else f"{best.median_ms:.4g} ms ({_label(best.config)})"
        self.progress.update(self.task, advance=1, best=best_text)

    def bucket_finished(self, bucket: BucketResult) -> None:
        # strategies may stop early or need one more run for the default: settle the total
        total = self.progress.tasks[self.task].total or 0
        self.progress.update(self.task, total=total + self._done - self._planned)
        self.on_bucket(bucket)


def _run_with_progress(
    console: Console, tuner: Tuner, jobs: list[Job], strategy: str, on_bucket: Callable[[BucketResult], None],
    known: list[dict],
) -> TuneRun:
    chosen = STRATEGIES[strategy]
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        total = sum(chosen.planned(len(job.candidates)) for job in jobs)
        return tuner.tune(jobs, chosen, _ProgressReporter(progress, tuner.tunable.name, total, on_bucket), known)


def _results_table(run: TuneRun, tunable: Tunable, gpu_name: str) -> Table:
    title = f"{run.kernel} on {gpu_name}: {run.strategy}, {run.wall_s:.1f} s"
    table = Table(title=title, caption=None if run.timing_meaningful else f"[bold red]{MEANINGLESS}[/]")
    columns = ("bucket", "tuned config", "tuned ms (p20-p80)", "GB/s", "default ms", "speed-up", "tried", "failed", "s")
    for column in columns:
        table.add_column(column, justify="left" if column in ("bucket", "tuned config") else "right")
    for b in run.buckets:
        default_ms = b.default.median_ms
        if b.best is None:
            tuned, ms, gb_s, speedup = "[red]no candidate passed[/]", "-", "-", "-"
        else:
            tuned = _label(b.best.config)
            ms = f"{b.best.median_ms:.4g} ({b.best.p20_ms:.4g}-{b.best.p80_ms:.4g})"
            gb_s = f"{tunable.bytes_moved(b.job.shape) / b.best.median_ms / 1e6:.4g}"
            speedup = f"{default_ms / b.best.median_ms:.2f}x" if default_ms else "-"
        table.add_row(
            _label(b.job.key), tuned, ms, gb_s, "-" if default_ms is None else f"{default_ms:.4g}", speedup,
            f"{b.tried}/{len(b.job.candidates)}", str(len(b.failures)), f"{b.wall_s:.1f}",
        )
    return table


def _print_failures(console: Console, run: TuneRun, limit: int = 12) -> None:
    failures = [(b.job.key, r) for b in run.buckets for r in b.failures]
    if not failures:
        return
    console.print(f"[yellow]{len(failures)} candidate(s) rejected (never eligible to win):[/]")
    for key, r in failures[:limit]:
        console.print(f"  {_label(key)} | {_label(r.config)} | {r.error}", soft_wrap=True)
    if len(failures) > limit:
        console.print(f"  ... and {len(failures) - limit} more (all listed in the config file)")


def _resolve_shapes(tunable: Tunable, spec: str, interpret: bool) -> list[dict]:
    try:
        shapes = tunable.shapes(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shapes") from None
    if not shapes:
        raise typer.BadParameter(f"no shapes in {spec!r}", param_hint="--shapes")
    for shape in shapes if interpret else ():
        if tunable.bytes_moved(shape) > MAX_INTERPRET_BYTES:
            raise typer.BadParameter(
                f"--interpret runs tiny shapes only (at most {MAX_INTERPRET_BYTES >> 10} KiB moved); "
                f"{shape_label(shape)} moves {tunable.bytes_moved(shape) >> 10} KiB. Try --shapes small.",
                param_hint="--shapes",
            )
    return shapes


@app.command()
def tune(
    kernel: Annotated[str, typer.Argument(help="A registered kernel (see `kwb info`), or 'all'.")],
    shapes: Annotated[
        Optional[str],
        typer.Option(help="minimax | small | minimax-ep (MoE: the expert-parallel chunk shapes) | custom 'T=4096,H=64,D=128;T=8192,...' (default: minimax; small with --interpret)."),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="; ".join(f"{name}: {s.summary}" for name, s in STRATEGIES.items()) + ".")
    ] = "exhaustive",
    interpret: Annotated[
        bool, typer.Option("--interpret", help="No GPU: run the pipeline through the Triton interpreter (meaningless timings).")
    ] = False,
    out_dir: Annotated[
        Optional[Path], typer.Option(help="Write configs under this folder instead of $KWB_CONFIG_DIR / kernels/configs.")
    ] = None,
    rep_ms: Annotated[
        Optional[float], typer.Option(help=f"Full timing budget per candidate in ms (default: {GPU_REP_MS:g}; {INTERPRET_REP_MS:g} with --interpret).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choices of the cheaper strategies.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds a candidate may take before its worker is killed.")] = 300.0,
    confirm_rounds: Annotated[
        Optional[int], typer.Option(min=0, help=f"Time the search's fastest --confirm-top configs and the default again in this many interleaved rounds and keep the one with the fastest median round (default: {GPU_CONFIRM_ROUNDS} on a GPU, 0 with --interpret).")
    ] = None,
    confirm_top: Annotated[int, typer.Option(min=1, help="How many of the search's fastest configs the confirmation rounds re-time.")] = 3,
    results: Annotated[
        Optional[Path], typer.Option(help="Also append every timed candidate and each bucket's winner to DIR/<kernel>-tune.jsonl (for the dashboards).")
    ] = None,
) -> None:
    """Tune KERNEL (or all kernels) on this GPU and write the per-GPU config file."""
    console = Console()
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"{strategy!r} is not one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    if interpret:
        _use_interpreter()
    elif not torch.cuda.is_available():
        console.print(
            "[bold red]kwb tune needs a CUDA GPU[/] (torch.cuda.is_available() is False). "
            "To exercise the pipeline without one, add --interpret (tiny shapes, Triton interpreter, meaningless timings)."
        )
        raise typer.Exit(code=2)

    from autotune import tunable as registry
    from autotune.runner import Tuner, TuneRun, plan
    from autotune.writer import known_winners, write_configs
    from kernels._config import device_slug

    kernels = registry.names() if kernel == "all" else [kernel]
    try:
        tunables = [registry.get(name) for name in kernels]
    except KeyError as exc:
        raise typer.BadParameter(exc.args[0], param_hint="KERNEL") from None
    spec = shapes or ("small" if interpret else "minimax")
    planned = [(t, plan(t, _resolve_shapes(t, spec, interpret))) for t in tunables]

    slug = "cpu" if interpret else device_slug()
    gpu_name = "CPU (Triton interpreter)" if interpret else torch.cuda.get_device_name()
    write = not interpret or out_dir is not None or "KWB_CONFIG_DIR" in os.environ
    if interpret:
        console.rule(f"[bold red]{MEANINGLESS}[/]")
    incomplete = False
    for t, jobs in planned:
        tuner = Tuner(
            t,
            device="cpu" if interpret else "cuda",
            isolate=not interpret,
            rep_ms=rep_ms if rep_ms is not None else (INTERPRET_REP_MS if interpret else GPU_REP_MS),
            timeout_s=timeout,
            seed=seed,
            confirm_rounds=confirm_rounds if confirm_rounds is not None else (0 if interpret else GPU_CONFIRM_ROUNDS),
            confirm_top=confirm_top,
        )
        done: list[BucketResult] = []

        appended = [0]

        def checkpoint(bucket: BucketResult) -> None:
            """Save each bucket's winner (and, with --results, its result lines; their
            ``run_wall_s`` is the run's wall time so far) as soon as its bucket ends, so a
            run that is killed (a timeout, Ctrl-C, a lost machine) keeps every bucket it
            finished."""
            done.append(bucket)
            partial = TuneRun(kernel=t.name, strategy=strategy, device=tuner.device,
                              timing_meaningful=tuner.timing_meaningful, rep_ms=tuner.rep_ms, buckets=list(done),
                              wall_s=sum(b.wall_s for b in done), worker_restarts=0, telemetry={})
            if write and bucket.best is not None:
                write_configs(t.name, [bucket.entry(strategy)], partial.meta(), slug=slug, root=out_dir)
            if results is not None:
                from autotune.records import tune_records
                from profiling import append_records

                this_bucket = dataclasses.replace(partial, buckets=[bucket])
                appended[0] += append_records(tune_records(t, this_bucket), results / f"{t.name}-tune.jsonl")

        # the winners already on file for this kernel and GPU seed every bucket's search
        known = known_winners(t.name, slug=slug, root=out_dir)
        if known:
            console.print(f"{t.name}: {len(known)} winner(s) already on file seed the search")
        run = _run_with_progress(console, tuner, jobs, strategy, checkpoint, known)
        console.print(_results_table(run, t, gpu_name))
        _print_failures(console, run)
        incomplete |= any(b.best is None for b in run.buckets)
        if results is not None:
            console.print(f"appended {appended[0]} result lines to {results / f'{t.name}-tune.jsonl'}")
        entries = run.entries()
        if not write:
            console.print("[yellow]not written[/]: --interpret results go only to --out-dir or $KWB_CONFIG_DIR")
        elif not entries:
            console.print(f"[red]nothing written for {t.name}: no bucket has a config that passed the reference check[/]")
        else:
            written = write_configs(t.name, entries, run.meta(), slug=slug, root=out_dir)
            if written.replaced.status in ("corrupt", "stale"):
                console.print(f"[yellow]replaced {written.replaced.status} file[/] ({written.replaced.problem}); "
                              f"the old one is now {written.kept}")
            console.print(f"wrote {len(entries)} bucket(s) to {written.path} ({written.entries} in the file)")
    if interpret:
        console.rule(f"[bold red]{MEANINGLESS}[/]")
    if incomplete:
        raise typer.Exit(code=1)


@app.command()
def info(
    model: Annotated[Optional[str], typer.Option(help="A model config (tiny, bench, minimax-text-01): list its kernel launches layer by layer instead.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the --model plan.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Prefill length of the --model plan.")] = 4096,
    backward: Annotated[bool, typer.Option(help="Also list the training backward's launches in the --model plan.")] = False,
    ep: Annotated[int, typer.Option(help="Experts sharded over this many ranks in the --model plan (1: none).")] = 1,
) -> None:
    """Show the GPU, versions, and which config file and buckets each kernel would use."""
    if model is not None:
        _model_plan(model, batch, seq_len, backward, ep)
        return
    from autotune import tunable as registry
    from kernels import _config
    from profiling import gpu_identity, versions

    console = Console()
    gpu = gpu_identity()
    if gpu is None:
        console.print("GPU: [yellow]no GPU[/] (kernels run through the Triton interpreter, TRITON_INTERPRET=1)")
    else:
        console.print(f"GPU: {gpu.name} (driver {gpu.driver}, {gpu.memory_gib:.0f} GiB, {gpu.sm_count} SMs, sm {gpu.compute_capability})")
    console.print("versions: " + ", ".join(f"{name} {value}" for name, value in versions().items()))
    source = "$KWB_CONFIG_DIR" if "KWB_CONFIG_DIR" in os.environ else "package default"
    console.print(f"config root: {_config.config_root()} ({source}); this device's folder: {_config.device_slug()}")

    for name in registry.names():
        t = registry.get(name)
        _print_config_file(console, name)
        used = Table(title="config used at run time, per shape of each shape set")
        for column in ("set", "shape", "bucket", "config"):
            used.add_column(column)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the file's status is reported above
            for set_name, set_shapes in t.shape_sets.items():
                for shape in set_shapes:
                    key = t.bucket(shape)
                    config = _config.lookup(name, key, default=t.default_config(shape), near=t.near)
                    used.add_row(set_name, shape_label(shape), _label(key), _label(config))
        console.print(used)
    _print_config_file(console, "moe_ffn_ep", "tuned by `python -m autotune.ep_bench` on a multi-GPU machine")


def _print_config_file(console: Console, kernel: str, how: str = "") -> None:
    """A kernel's config file for this GPU: path, status, tuning metadata and its buckets."""
    from kernels import _config

    found = _config.read_config_file(_config.config_path(kernel))
    style = {"ok": "green", "missing": "yellow"}.get(found.status, "red")
    console.rule(kernel)
    console.print(f"file: {found.path} [{style}]{found.status}[/] {found.problem}" + (f" ({how})" if how else ""),
                  soft_wrap=True)
    if found.data is not None:
        meta = found.data.get("meta", {})
        console.print(
            "tuned: " + ", ".join(f"{k} {meta.get(k)}" for k in ("date", "gpu", "triton", "strategy", "timing_meaningful"))
        )
    entries = Table(title=f"{len(found.entries)} bucket(s) in the file")
    for column in ("bucket", "config", "median ms", "default ms"):
        entries.add_column(column)
    for e in found.entries:
        entries.add_row(_label(e["key"]), _label(e["config"]), str(e.get("median_ms", "-")), str(e.get("default_ms", "-")))
    console.print(entries)


def _model_plan(name: str, batch: int, seq_len: int, backward: bool, ep: int) -> None:
    """``kwb info --model NAME``: every kernel launch of the model with its file, bucket, config."""
    from kernels import _config
    from model import kernel_plan

    console = Console()
    phases = ("prefill", "decode") + (("backward",) if backward else ())
    try:
        rows = kernel_plan(name, batch, seq_len, phases=phases, ep_size=ep)
    except ValueError as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(code=2)
    console.print(f"model {name}: batch {batch}, prefill {seq_len} tokens"
                  + (f", experts over {ep} ranks (per rank)" if ep > 1 else "") + f"; configs for {_config.device_slug()} "
                  f"under {_config.config_root()}")
    table = Table(title=f"{len(rows)} launches (the lookup each makes at run time; nothing is tuned at run time)")
    for column in ("layer", "kind", "phase", "op", "kernel", "bucket", "file", "config", "from"):
        table.add_column(column)
    for r in rows:
        style = {"ok": "green", "missing": "yellow", "untuned": "dim"}.get(r.file_status, "red")
        source = "[green]tuned[/]" if r.tuned else ("" if r.kernel == "torch.sdpa" else "[yellow]default[/]")
        table.add_row(str(r.layer), r.kind, r.phase, r.op, r.kernel, _label(r.key),
                      f"[{style}]{r.file_status}[/]", _label(r.config), source)
    console.print(table)


@app.command()
def check() -> None:
    """Check every kernel against its reference on fresh random inputs and print a table.

    Without a GPU the kernels run through the Triton interpreter on small shapes.
    """
    if not torch.cuda.is_available():
        _use_interpreter()
    from autotune.check import mode, run_checks

    console = Console()
    console.print(f"checking kernels: {mode()}")
    results = run_checks()
    table = Table(title="kernels vs references (relative Frobenius error of outputs and final state)")
    for column in ("kernel", "case", "dtype", "rel. error", "tolerance", "s", "result"):
        table.add_column(column, no_wrap=column != "case")
    for r in results:
        verdict = "[green]ok[/]" if r.ok else "[bold red]FAIL[/]"
        table.add_row(r.kernel, r.case, r.dtype, f"{r.rel_err:.2e}", f"{r.tol:.0e}", f"{r.seconds:.1f}", verdict)
    console.print(table)
    failed = [r for r in results if not r.ok]
    console.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def bench(
    results: Annotated[Path, typer.Option(help="Folder the results lines are appended to.")] = Path("results"),
    select: Annotated[Optional[str], typer.Option("-k", help="pytest -k expression, e.g. 'ours and T16384'.")] = None,
) -> None:
    """Run the benchmark suite (tests/benchmarks, pytest-benchmark) on this GPU; append results lines."""
    import subprocess

    if not torch.cuda.is_available():
        Console().print("[bold red]kwb bench needs a CUDA GPU[/]; `kwb check` works without one.")
        raise typer.Exit(code=2)
    suite = Path(__file__).resolve().parent.parent / "tests" / "benchmarks"
    if not suite.is_dir():
        Console().print(f"[bold red]no benchmark suite at {suite}[/]: run kwb bench from a checkout of the repository")
        raise typer.Exit(code=2)
    command = [sys.executable, "-m", "pytest", str(suite), "--benchmark-enable", "-q", "-p", "no:cacheprovider"]
    if select:
        command += ["-k", select]
    env = {**os.environ, "KWB_RESULTS_DIR": str(results)}
    raise typer.Exit(code=subprocess.call(command, env=env, cwd=suite.parent.parent))


@app.command()
def dashboard(
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    results: Annotated[
        Optional[Path], typer.Option(help="Results folder or .jsonl file (default: the repository's committed results/).")
    ] = None,
    gpu: Annotated[Optional[str], typer.Option(help="Only results of this GPU slug, e.g. nvidia-h100-80gb-hbm3.")] = None,
    configs: Annotated[
        Optional[Path], typer.Option(help="Config root whose <gpu>/<kernel>.json winners the heatmaps mark (default: kernels/configs).")
    ] = None,
) -> None:
    """Write the interactive performance dashboard: one self-contained HTML file (works offline)."""
    from dashboards.data import load_results
    from dashboards.report import write_report

    console = Console()
    source = results if results is not None else Path(__file__).resolve().parent.parent / "results"
    if not source.exists():
        console.print(f"[bold red]no results at {source}[/]: pass --results DIR (a folder of .jsonl files or one file)")
        raise typer.Exit(code=2)
    found = load_results(source, gpu=gpu)
    path = write_report(found, output, configs_root=configs)
    for problem in found.problems:
        console.print(f"[yellow]skipped[/] {problem}", soft_wrap=True)
    if not found.records:
        console.print(f"[yellow]No results found in {source}{f' for GPU {gpu}' if gpu else ''}[/]; wrote a page that says so: {path}")
        return
    gpus = sorted({r.gpu.get("slug") or "no-gpu" for r in found.records})
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) from {len(found.records)} records "
                  f"in {len(found.files)} file(s), GPU(s): {', '.join(gpus)}")
