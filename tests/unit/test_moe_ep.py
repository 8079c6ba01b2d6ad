"""Expert-parallel MoE FFN (kernels.a2a_overlap.moe_ffn_ep) on CPU: gloo on 127.0.0.1, one
spawned process per rank, Triton kernels in the interpreter in every child.

Each child builds the SAME full inputs from a seed, takes its token slice and its expert
shard, runs moe_ffn_ep (num_chunks 1 and 3, NCCL-style all-to-all on gloo and the copy
transport over shared-memory workspaces; with 1 chunk also the flags transport, whose GEMMs
wait on and count per-expert flags) and the blocking reference moe_ffn_ep_ref,
backpropagates a fixed random dout, and saves outputs and gradients. The parent compares
them, concatenated over ranks, with single-process moe_ffn (fp32) and moe_ffn_ref (float64)
on the full weights. A child that hangs is killed at the wall limit and the test fails.
"""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import assert_close  # noqa: E402
from tests.ranks import spawn_ranks  # noqa: E402

HD, F = 32, 16
WALL_S = 150  # per spawned test; gloo's own timeout is 60 s
TOL = 1e-5
CHUNKS = (1, 3)


def _inputs(case: dict) -> dict:
    """Full inputs (all ranks' tokens, all experts), identical in every process."""
    g = torch.Generator().manual_seed(case["seed"])
    T, E = sum(case["tokens"]), case["E"]
    logits = torch.randn(T, E, generator=g) * 2
    if case.get("skew"):
        E_l = E // case["W"]
        logits[:, E - E_l:] -= 30.0  # the last rank's experts: never chosen
    return {
        "x": torch.randn(T, HD, generator=g),
        "logits": logits,
        "w_gate_up": torch.randn(E, HD, 2 * F, generator=g) / HD**0.5,
        "w_down": torch.randn(E, F, HD, generator=g) / F**0.5,
        "dout": torch.randn(T, HD, generator=g),
    }


def _token_range(rank, case) -> tuple[int, int]:
    t0 = sum(case["tokens"][:rank])
    return t0, t0 + case["tokens"][rank]


def _shard(inp, rank, case) -> list[torch.Tensor]:
    """This rank's tokens and logits, and its experts' weights (copies)."""
    E_l = case["E"] // case["W"]
    t0, t1 = _token_range(rank, case)
    return [inp["x"][t0:t1].clone(), inp["logits"][t0:t1].clone(),
            inp["w_gate_up"][rank * E_l:(rank + 1) * E_l].clone(), inp["w_down"][rank * E_l:(rank + 1) * E_l].clone()]


def _run_rank(fn, inp, rank, case, **kw):
    """Run fn on this rank's slice/shard; return out and grads (x, logits, w_gate_up, w_down)."""
    t0, t1 = _token_range(rank, case)
    leaves = [t.requires_grad_() for t in _shard(inp, rank, case)]
    out = fn(*leaves, case["top_k"], **kw)
    (out.double() * inp["dout"][t0:t1].double()).sum().backward()
    # None (a leaf autograd never reached: the reference's weights on a rank that receives
    # no rows) means a zero gradient
    grads = {n: l.grad if l.grad is not None else torch.zeros_like(l)
             for n, l in zip(("x", "logits", "w_gate_up", "w_down"), leaves)}
    return {"out": out.detach()} | grads


def _worker(rank: int, port: int, case: dict) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    if case.get("config_dir"):
        os.environ["KWB_CONFIG_DIR"] = case["config_dir"]
    import torch.distributed as dist

    from tests.conftest import nan_empty

    torch.empty = nan_empty  # unwritten outputs fail the comparison
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=case["W"],
        timeout=datetime.timedelta(seconds=case.get("pg_timeout_s", 60)),
    )
    from kernels.a2a_overlap import moe_ffn_ep
    from reference.moe_ep import moe_ffn_ep_ref

    result = {"time": {}}
    if case.get("hang_rank") is not None:
        # one rank never joins the exchange: the other ranks must fail with a clear
        # error after the process group's timeout, not hang
        inp = _inputs(case)
        if rank == case["hang_rank"]:
            time.sleep(case["pg_timeout_s"] * 2)
        else:
            t = time.perf_counter()
            try:
                _run_rank(moe_ffn_ep, inp, rank, case)
            except RuntimeError as exc:
                result["error"] = str(exc)
            result["time"]["fail"] = time.perf_counter() - t
        return result
    if case.get("bad_E"):
        # W does not divide E: every rank raises before any collective ...
        E_bad = case["bad_E"]
        try:
            moe_ffn_ep(torch.randn(3, HD), torch.randn(3, E_bad), torch.randn(1, HD, 2 * F),
                       torch.randn(1, F, HD), 2)
        except ValueError as exc:
            result["error"] = str(exc)
    inp = _inputs(case)
    if case.get("grow"):
        # a tiny granule and a first call on half the tokens: the next calls find a workspace
        # large enough for their own rows (the early gather goes into it) but not for all they
        # receive, so it grows under them, and they must gather again into the new one
        from kernels.a2a_overlap import workspace

        workspace.GRANULE_BYTES = 64
        half = dict(case, tokens=[t // 2 for t in case["tokens"]])
        _run_rank(moe_ffn_ep, _inputs(dict(half, seed=case["seed"] + 1)), rank, half, num_chunks=1, transport="copy")
    # ... so the collectives that follow still pair up
    for C in case.get("chunks", CHUNKS):
        t = time.perf_counter()
        result[f"ep{C}"] = _run_rank(moe_ffn_ep, inp, rank, case, num_chunks=C)
        result["time"][f"ep{C}"] = time.perf_counter() - t
        # the copy transport: rows pulled from the peers' shared-memory workspaces
        result[f"copy{C}"] = _run_rank(moe_ffn_ep, inp, rank, case, num_chunks=C, transport="copy")
        if C == 1:  # the flags transport (unchunked): the GEMMs check and count per-expert flags
            result["flags1"] = _run_rank(moe_ffn_ep, inp, rank, case, num_chunks=1, transport="flags")
            with torch.no_grad():  # no copy out of the workspace: the weighted sum reads it in place,
                # and the second call (other inputs first) rewrites every workspace under the same tensors
                other = _inputs(dict(case, seed=case["seed"] + 100))
                for args in (_shard(other, rank, case), _shard(inp, rank, case)):
                    out = moe_ffn_ep(*args, case["top_k"], num_chunks=1, transport="flags")
                result["flags1_no_grad"] = {"out": out}
    if case.get("config_dir"):
        from kernels.a2a_overlap import api

        started = []  # a dispatch and a combine per chunk: how many chunks the tuned call used
        api.start_exchange = lambda *a, _start=api.start_exchange, **k: started.append(1) or _start(*a, **k)
        calls = {"all_gather": 0, "all_reduce": 0}  # the tuned call's collectives besides the exchanges
        for name in calls:
            setattr(dist, name, lambda *a, _f=getattr(dist, name), _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _f(*a, **k))
        result["tuned"] = _run_rank(moe_ffn_ep, inp, rank, case)  # num_chunks from the file
        result["tuned_chunks"] = len(started) // 2
        result["tuned_collectives"] = dict(calls)
        result["ctas"] = _run_rank(moe_ffn_ep, inp, rank, case, num_chunks=3, comm_ctas=8)  # no SMs on gloo
    if case.get("ref", True):
        result["ref"] = _run_rank(moe_ffn_ep_ref, inp, rank, case)
    dist.destroy_process_group()
    return result


def _spawn(case: dict, outdir) -> list[dict]:
    return spawn_ranks(_worker, case, outdir, WALL_S)


def _single_process(case: dict):
    """moe_ffn (fp32 kernels) and moe_ffn_ref (float64) on the full weights, with gradients."""
    from kernels.moe_gemm import moe_ffn
    from reference.moe import moe_ffn_ref

    inp = _inputs(case)
    res = {}
    for name, fn in (("moe_ffn", moe_ffn), ("moe_ffn_ref", moe_ffn_ref)):
        leaves = [inp[n].clone().requires_grad_() for n in ("x", "logits", "w_gate_up", "w_down")]
        out = fn(*leaves, case["top_k"])
        (out.double() * inp["dout"].double()).sum().backward()
        res[name] = {"out": out.detach()} | {n: l.grad for n, l in zip(("x", "logits", "w_gate_up", "w_down"), leaves)}
    return res


def _gathered(results: list[dict], key: str) -> dict:
    """Outputs and grads concatenated over ranks (tokens for out/x/logits, experts for weights)."""
    return {n: torch.cat([r[key][n] for r in results]) for n in ("out", "x", "logits", "w_gate_up", "w_down")}


def _check(case, results):
    single = _single_process(case)
    chunks = case.get("chunks", CHUNKS)
    keys = [f"{t}{C}" for C in chunks for t in ("ep", "copy")] + (["ref"] if case.get("ref", True) else [])
    keys += ["flags1"] if 1 in chunks else []
    for key in keys:
        got = _gathered(results, key)
        for ref_name in ("moe_ffn", "moe_ffn_ref"):
            for n, t in got.items():
                if n == "logits" and case["top_k"] == 1:
                    # the renormalised weight is constant 1: the kernels' gradient is exactly
                    # zero, the float64 reference's is round-off (~1e-17); relative error is moot
                    assert t.abs().max().item() <= 1e-12 and single[ref_name][n].abs().max().item() <= 1e-12
                    continue
                assert_close(f"{key}.{n} vs {ref_name}", t.double(), single[ref_name][n].double(), TOL)
    if 1 in chunks:
        got = torch.cat([r["flags1_no_grad"]["out"] for r in results])
        for ref_name in ("moe_ffn", "moe_ffn_ref"):
            assert_close(f"flags1_no_grad.out vs {ref_name}", got.double(), single[ref_name]["out"].double(), TOL)
    # chunked and unchunked agree (the same per-row arithmetic, so to round-off at most)
    for n, t in _gathered(results, f"ep{CHUNKS[-1]}").items():
        if n == "logits" and case["top_k"] == 1:
            assert torch.equal(t, _gathered(results, "ep1")[n])
            continue
        assert_close(f"ep{CHUNKS[-1]}.{n} vs ep1", t, _gathered(results, "ep1")[n], TOL)
    print({f"rank{r}": {k: round(v, 2) for k, v in res["time"].items()} for r, res in enumerate(results)})


CASES = {
    2: dict(W=2, E=6, tokens=[9, 6], top_k=2, seed=1, chunks=(1, 2, 3)),  # 2 chunks: 1 + 2 experts
    3: dict(W=3, E=9, tokens=[7, 10, 4], top_k=2, seed=2),
    4: dict(W=4, E=12, tokens=[5, 8, 3, 6], top_k=2, seed=3),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("W", [2, 3, 4])
def test_ep_matches_single_process(W, tmp_path):
    case = CASES[W]
    _check(case, _spawn(case, tmp_path))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("W", [2, 3, 4])
def test_ep_uneven_routing(W, tmp_path):
    """Rank 0 has no tokens (sends nothing); the last rank's experts are never chosen (it
    receives nothing); T differs per rank and num_chunks 3 exceeds some ranks' T."""
    E = {2: 6, 3: 9, 4: 12}[W]
    case = dict(W=W, E=E, tokens=[0, 5, 2, 7][:W], top_k=2, seed=10 + W, skew=True)
    _check(case, _spawn(case, tmp_path))


@pytest.mark.timeout(180)
def test_ep_world_size_8(tmp_path):
    """Issue 9 on CPU: 8 ranks, 3 experts each, so each rank keeps ~1/8 of its token copies and
    sends the rest away; one rank has no tokens."""
    case = dict(W=8, E=24, tokens=[3, 0, 5, 2, 4, 1, 6, 2], top_k=2, seed=8)
    _check(case, _spawn(case, tmp_path))


@pytest.mark.timeout(180)
def test_ep_tuned_config_is_agreed_across_ranks(tmp_path):
    """num_chunks=None: every rank takes the tuned config of the LARGEST token count (rank 0
    alone would find the T=4 bucket's 2 chunks, rank 1 the T=16 bucket's 3): the ranks agree,
    nothing hangs, the only collective besides the exchanges is the count all-gather, and the
    result is the 3-chunk schedule's, bit for bit. comm_ctas is a no-op on gloo."""
    import triton

    from autotune import writer
    from kernels.a2a_overlap import schedule

    W, E = 2, 6
    entries = [{"key": schedule.bucket_key(W, E, HD, F, T, torch.float32), "config": {"num_chunks": C, "comm_ctas": 0},
                "median_ms": 1.0} for T, C in ((4, 2), (16, 3))]
    writer.write_configs(schedule.KERNEL, entries, {"triton": triton.__version__, "strategy": "test"}, slug="cpu",
                         root=tmp_path / "configs")
    case = dict(W=W, E=E, tokens=[3, 9], top_k=2, seed=12, config_dir=str(tmp_path / "configs"))
    results = _spawn(case, tmp_path)
    assert [r["tuned_chunks"] for r in results] == [3, 3]
    # the largest token count comes from the count all-gather: no extra collective
    assert [r["tuned_collectives"] for r in results] == [{"all_gather": 1, "all_reduce": 0}] * 2
    for key in ("tuned", "ctas"):
        for n in ("out", "x", "logits", "w_gate_up", "w_down"):
            assert torch.equal(_gathered(results, key)[n], _gathered(results, "ep3")[n]), (key, n)
    _check(case, results)


@pytest.mark.timeout(180)
def test_copy_transport_workspace_grows_between_calls(tmp_path):
    case = dict(W=2, E=6, tokens=[8, 6], top_k=2, seed=21, grow=True, ref=False)
    _check(case, _spawn(case, tmp_path))


@pytest.mark.timeout(180)
def test_ep_top1(tmp_path):
    case = dict(W=2, E=6, tokens=[6, 4], top_k=1, seed=7)
    _check(case, _spawn(case, tmp_path))


@pytest.mark.timeout(180)
def test_world_size_not_dividing_experts_raises(tmp_path):
    """E = 3 on 2 ranks: ValueError on every rank before any collective, after which the
    ranks' collectives still pair up (a normal call completes)."""
    case = dict(W=2, E=4, tokens=[3, 2], top_k=2, seed=5, bad_E=3, chunks=(1,), ref=False)
    results = _spawn(case, tmp_path)
    for r in results:
        assert "must divide" in r.get("error", ""), r.get("error")
    single = _single_process(case)
    assert_close("out", _gathered(results, "ep1")["out"], single["moe_ffn"]["out"], TOL)


def test_world_size_one_no_communication(monkeypatch):
    """No process group: W = 1, moe_ffn on the local (= all) experts, no collective."""
    import torch.distributed as dist

    from kernels.a2a_overlap import moe_ffn_ep
    from reference.moe import moe_ffn_ref

    def no_collective(*a, **k):
        raise AssertionError("W = 1 must not communicate")

    monkeypatch.setattr(dist, "all_to_all_single", no_collective)
    case = dict(W=1, E=4, tokens=[10], top_k=2, seed=9)
    inp = _inputs(case)
    for C in CHUNKS:
        leaves = [inp[n].clone().requires_grad_() for n in ("x", "logits", "w_gate_up", "w_down")]
        out = moe_ffn_ep(*leaves, 2, num_chunks=C)
        (out * inp["dout"]).sum().backward()
        ref_leaves = [inp[n].clone().requires_grad_() for n in ("x", "logits", "w_gate_up", "w_down")]
        ref = moe_ffn_ref(*ref_leaves, 2)
        (ref * inp["dout"].double()).sum().backward()
        assert_close("out", out, ref, TOL)
        for n, a, b in zip(("x", "logits", "w_gate_up", "w_down"), leaves, ref_leaves):
            assert_close(f"d{n}", a.grad, b.grad, TOL)


def test_bad_arguments_raise_without_group():
    from kernels.a2a_overlap import moe_ffn_ep

    x, logits = torch.randn(4, HD), torch.randn(4, 4)
    wgu, wd = torch.randn(4, HD, 2 * F), torch.randn(4, F, HD)
    with pytest.raises(ValueError, match="num_chunks"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=0)
    with pytest.raises(ValueError, match="comm_ctas needs num_chunks"):
        moe_ffn_ep(x, logits, wgu, wd, 2, comm_ctas=8)
    with pytest.raises(ValueError, match="comm_ctas"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=2, comm_ctas=-1)
    with pytest.raises(ValueError, match="local experts"):
        moe_ffn_ep(x, logits, wgu[:2], wd, 2)
    with pytest.raises(ValueError, match="transport needs num_chunks"):
        moe_ffn_ep(x, logits, wgu, wd, 2, transport="copy")
    with pytest.raises(ValueError, match="transport must be one of"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=1, transport="nvshmem")
    with pytest.raises(ValueError, match="copy transport has none"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=1, comm_ctas=8, transport="copy")
    with pytest.raises(ValueError, match="flags transport runs unchunked"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=2, transport="flags")
    with pytest.raises(ValueError, match="num_chunks = 5 exceeds"):
        moe_ffn_ep(x, logits, wgu, wd, 2, num_chunks=5)  # W = 1: 4 local experts
    with pytest.raises(ValueError, match="top_k"):
        moe_ffn_ep(x, logits, wgu, wd, 5)


@pytest.mark.timeout(180)
def test_hung_peer_times_out_with_clear_error(tmp_path):
    """Rank 1 never calls moe_ffn_ep: rank 0 raises a RuntimeError naming moe_ffn_ep and its
    rank after the process group's timeout (5 s here) instead of hanging."""
    case = dict(W=2, E=4, tokens=[4, 4], top_k=2, seed=4, hang_rank=1, pg_timeout_s=5)
    results = _spawn(case, tmp_path)
    err = results[0].get("error", "")
    assert "moe_ffn_ep" in err and "rank 0" in err, err
    assert results[0]["time"]["fail"] < 40, results[0]["time"]
    print(f"rank 0 failed after {results[0]['time']['fail']:.1f} s: {err[:300]}")
