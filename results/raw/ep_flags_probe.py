"""Probe (issue 6, for a 2-GPU run): expert parallelism WITHOUT chunking the GEMMs.

One process drives 2 GPUs (W=2, E=32, 16 local experts each, hidden 6144, expert hidden 9216,
bf16, balanced routing: R rows per (source, expert)). Per device d, peer p:

  serial:   pull every (expert, source) block into recv (copy engines), the SwiGLU up GEMM and
            the down GEMM over all 16 local experts (one launch each), push every output block
            back to its source; all on one stream.
  flags:    the GEMMs launch at once on the compute stream; the dispatch stream pulls expert by
            expert and, after each expert's blocks, sets ready[e] = 1 with a stream memory op
            (cuStreamWriteValue32; no SM); the up GEMM's programs spin (atomic acquire) until
            their expert is ready. The down GEMM's programs add 1 to done[e] after their store
            (release); the combine stream waits (cuStreamWaitValue32 GEQ tiles_e) per expert and
            pushes that expert's blocks. The compute stream waits for the combine stream.
  flags_copyflag: the same, but ready[e] is set by a 4-byte copy of a 1 from the peer (a copy
            engine op; in case a stream write behaves differently); the combine still waits with
            cuStreamWaitValue32.
  flags_dispatch_only / flags_combine_only: one side flagged, the other serial on the compute
            stream (which side pays); gemms_flagged: the GEMMs with every expert ready (the cost
            of the spin and the counters).

Copies are cuMemcpyAsync on the issuing stream with peer pointers (UVA, peer access enabled),
as the tree's copy transport gets through symmetric memory: torch's cross-device copy_ would
run on the SOURCE device's current stream with two-way event barriers.

Both devices run their schedule at the same time (the NVLink and HBM load of a real W=2 call).
Reports medians over interleaved repetitions of the slower device: gemms alone, pulls alone,
pushes alone, serial, flags; hidden = (serial - flags) / (pulls + pushes); the outputs of
flags must equal serial's bit for bit (checked first).

The kernel is the tree's _grouped_gemm_kernel text-patched (WAIT/SIGNAL constexprs); not
in the tree until this probe says it pays.
Usage: PYTHONPATH=. python results/raw/ep_flags_probe.py OUT.json [T_per_rank ...]
"""
import ctypes
import functools
import importlib
import importlib.util
import inspect
import json
import statistics
import sys
import tempfile
import time

import torch
import triton

gg = importlib.import_module("kernels.moe_gemm.grouped_gemm")  # (the package re-exports a function of that name)

# ---------------------------------------------------------------- the patched kernel
src = inspect.getsource(gg)
start = src.index("@triton.jit\ndef _grouped_gemm_kernel(")
end = src.index("@triton.jit\ndef _dw_tile(")
kernel = src[start:end]
patches = [
    ("a, b, c, offsets, a_rows, aux, a_desc, b_desc,", "a, b, c, offsets, a_rows, aux, a_desc, b_desc, ready, done,"),
    ("    DOT_PRECISION: tl.constexpr,\n):", "    DOT_PRECISION: tl.constexpr, WAIT: tl.constexpr, SIGNAL: tl.constexpr,\n):"),
    ("    row_end = tl.load(offsets + i_e)\n",
     "    row_end = tl.load(offsets + i_e)\n"
     "    if WAIT:\n"
     "        flag = tl.inline_asm_elementwise(\"ld.acquire.gpu.global.b32 $0, [$1];\", \"=r,l\", [ready + i_e],\n"
     "                                         dtype=tl.int32, is_pure=False, pack=1)\n"
     "        while flag == 0:\n"
     "            flag = tl.inline_asm_elementwise(\"ld.acquire.gpu.global.b32 $0, [$1];\", \"=r,l\", [ready + i_e],\n"
     "                                             dtype=tl.int32, is_pure=False, pack=1)\n"),
]
for old, new in patches:
    assert kernel.count(old) == 1, old
    kernel = kernel.replace(old, new)
kernel = kernel.rstrip() + (
    "\n    if SIGNAL:\n"
    "        tl.debug_barrier()\n"
    "        tl.atomic_add(done + i_e, 1, sem=\"release\")\n")
mod_src = "import triton\nimport triton.language as tl\n\n\n" + kernel
tmp = tempfile.NamedTemporaryFile("w", suffix="_gg_flags.py", delete=False)
tmp.write(mod_src)
tmp.close()
spec = importlib.util.spec_from_file_location("gg_flags", tmp.name)
gg_flags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gg_flags)


def launch(a, w, c, offsets, N, K, config, *, a_rows=None, epilogue="none", ready=None, done=None):
    """gg._launch (forward strides, no aux) plus the flags."""
    M, E = c.shape[0], offsets.shape[0]
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    num_pid_m = min(triton.cdiv(M, BM) + E - 1, M)
    grid = (num_pid_m * triton.cdiv(N, BN),)
    tma_a = a_rows is None and gg.tma_loadable(a)
    b_rows = gg._weight_rows(w)
    tma_b = b_rows is not None and gg.tma_loadable(b_rows) and K % BK == 0
    a_desc = gg.tensor_descriptor(a, [BM, BK]) if tma_a else None
    b_desc = gg.tensor_descriptor(b_rows, [BK, BN]) if tma_b else None
    gg_flags._grouped_gemm_kernel[grid](
        a, w, c, offsets, a_rows, None, a_desc, b_desc, ready, done,
        N, K, num_pid_m, a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        c.stride(0), c.stride(1), 0, 0,
        NUM_EXPERTS=E, E_POW2=triton.next_power_of_2(E), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        GROUP_M=config["GROUP_M"], HAS_GATHER=a_rows is not None, EPILOGUE=epilogue, STORE_PREACT=False,
        EVEN_K=K % BK == 0, TMA_A=tma_a, TMA_B=tma_b, B_T=False, DOT_PRECISION=gg._dot_precision(a.dtype),
        WAIT=ready is not None, SIGNAL=done is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def configs(E, M, Hd, F, dtype):
    up = gg._swiglu_config(gg._resolve(gg.KERNEL_SWIGLU, gg.bucket_key(E, 2 * F, Hd, M, dtype),
                                       gg.default_config(E, M), None, gg.valid_swiglu_config))
    down = gg._resolve(gg.KERNEL, gg.bucket_key(E, Hd, F, M, dtype), gg.default_config(E, M), None, gg.valid_config)
    return up, down


# ---------------------------------------------------------------- stream memory ops
@functools.lru_cache(maxsize=None)
def _driver(name):
    lib = ctypes.CDLL("libcuda.so.1")
    for n in (name + "_v2", name):
        if hasattr(lib, n):
            f = getattr(lib, n)
            f.restype = ctypes.c_int
            if name == "cuMemcpyAsync":
                f.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
            else:
                f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            return f
    raise RuntimeError(f"libcuda has no {name}")


def copy(stream, dst, src):
    """dst <- src (contiguous, same bytes, any devices) on ``stream`` (a copy engine)."""
    assert dst.is_contiguous() and src.is_contiguous() and dst.nbytes == src.nbytes
    rc = _driver("cuMemcpyAsync")(dst.data_ptr(), src.data_ptr(), dst.nbytes, ctypes.c_void_p(stream.cuda_stream))
    if rc:
        raise RuntimeError(f"cuMemcpyAsync: CUresult {rc}")


def write_value(stream, t, value):
    rc = _driver("cuStreamWriteValue32")(ctypes.c_void_p(stream.cuda_stream), t.data_ptr(), value, 0)
    if rc:
        raise RuntimeError(f"cuStreamWriteValue32: CUresult {rc}")


def wait_value_geq(stream, t, value):
    rc = _driver("cuStreamWaitValue32")(ctypes.c_void_p(stream.cuda_stream), t.data_ptr(), value, 0)  # CU_STREAM_WAIT_VALUE_GEQ
    if rc:
        raise RuntimeError(f"cuStreamWaitValue32: CUresult {rc}")


# ---------------------------------------------------------------- the two devices' state
E_L, HD, F, W = 16, 6144, 9216, 2
DT = torch.bfloat16


class Dev:
    def __init__(self, d, R):
        self.d, self.R = d, R
        dev = self.dev = torch.device("cuda", d)
        g = torch.Generator(device=dev).manual_seed(100 + d)
        self.w_gu = (torch.randn(E_L, HD, 2 * F, device=dev, dtype=DT, generator=g) * 0.02)
        self.w_dn = (torch.randn(E_L, F, HD, device=dev, dtype=DT, generator=g) * 0.02)
        M = E_L * W * R
        # recv (expert-major, source-minor) and xs (what d sends: (dest, expert) blocks) share one buffer, so the
        # up GEMM's gather reads the local (e, d) blocks in place: a same-device cuMemcpyAsync is slow on a copy
        # engine, and as an SM kernel it never starts under a spinning GEMM that owns every SM
        self.abuf = torch.empty(M + W * E_L * R, HD, device=dev, dtype=DT)
        self.recv, self.xs = self.abuf[:M], self.abuf[M:]
        self.xs.copy_(torch.randn(W * E_L * R, HD, device=dev, dtype=DT, generator=g))
        self.h = torch.empty(M, F, device=dev, dtype=DT)
        self.y = torch.empty(M, HD, device=dev, dtype=DT)
        self.ybuf = torch.empty(W * E_L * R, HD, device=dev, dtype=DT)  # d's rows back, (dest-expert) blocks
        rows = torch.arange(M, device=dev, dtype=torch.int32).view(E_L, W, R)
        rows[:, d] = M + (d * E_L + torch.arange(E_L, device=dev, dtype=torch.int32)[:, None]) * R + torch.arange(
            R, device=dev, dtype=torch.int32)
        self.rows = rows.reshape(-1)  # identity over the peers' blocks, the local blocks straight from xs
        self.ends = torch.tensor([(e + 1) * W * R for e in range(E_L)], device=dev, dtype=torch.int32)
        self.ready = torch.zeros(E_L, device=dev, dtype=torch.int32)
        self.done = torch.zeros(E_L, device=dev, dtype=torch.int32)
        self.one = torch.ones(1, device=dev, dtype=torch.int32)
        self.cfg_up, self.cfg_dn = configs(E_L, M, HD, F, DT)
        BM, BN = self.cfg_dn["BLOCK_M"], self.cfg_dn["BLOCK_N"]
        self.tiles = [triton.cdiv(W * R, BM) * triton.cdiv(HD, BN)] * E_L  # down GEMM programs per expert
        self.compute = torch.cuda.Stream(dev)
        self.dispatch = torch.cuda.Stream(dev)
        self.combine = torch.cuda.Stream(dev)

    # block views
    def recv_block(self, e, s):
        return self.recv[(e * W + s) * self.R:(e * W + s + 1) * self.R]

    def send_block(self, q, e):  # rows d sends to rank q's local expert e
        return self.xs[(q * E_L + e) * self.R:(q * E_L + e + 1) * self.R]

    def y_block(self, e, s):
        return self.y[(e * W + s) * self.R:(e * W + s + 1) * self.R]

    def ybuf_block(self, q, e):  # rows d sent to q's expert e, after the experts
        return self.ybuf[(q * E_L + e) * self.R:(q * E_L + e + 1) * self.R]


def pull(devs, d, e, stream):  # the peers' blocks only (the local one is read in place)
    for s in range(W):
        if s != d:
            copy(stream, devs[d].recv_block(e, s), devs[s].send_block(d, e))


def push(devs, d, e, stream):  # to the peers only (the local rows' outputs stay in y)
    for s in range(W):
        if s != d:
            copy(stream, devs[s].ybuf_block(d, e), devs[d].y_block(e, s))


def gemms(me, wait=False, signal=False):
    launch(me.recv, me.w_gu, me.h, me.ends, F, HD, me.cfg_up, a_rows=me.rows, epilogue="swiglu",
           ready=me.ready if wait else None)
    launch(me.h, me.w_dn, me.y, me.ends, HD, F, me.cfg_dn, done=me.done if signal else None)


TIMELINE = None  # when a list: (device, label, event) marks of one flags run


def mark(d, label, stream):
    if TIMELINE is not None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        TIMELINE.append((d, label, ev))


def run(devs, variant):
    """Issue ``variant`` on both devices; returns per-device (start, end) events on the compute stream."""
    evs = []
    for me in devs:
        d = me.d
        with torch.cuda.device(d):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(me.compute):
                st.record()
                if TIMELINE is not None:
                    TIMELINE.append((d, "start", st))
                if variant == "gemms":
                    gemms(me)
                elif variant == "pulls":
                    for e in range(E_L):
                        pull(devs, d, e, me.compute)
                elif variant == "pushes":
                    for e in range(E_L):
                        push(devs, d, e, me.compute)
                elif variant == "serial":
                    for e in range(E_L):
                        pull(devs, d, e, me.compute)
                    gemms(me)
                    for e in range(E_L):
                        push(devs, d, e, me.compute)
                elif variant == "concurrent":  # no dependencies (wrong values): can copies run beside the GEMMs?
                    z = torch.cuda.Event()
                    z.record()
                    me.dispatch.wait_event(z)
                    for e in range(E_L):
                        pull(devs, d, e, me.dispatch)
                    for e in range(E_L):
                        push(devs, d, e, me.dispatch)
                    gemms(me)
                    k = torch.cuda.Event()
                    k.record(me.dispatch)
                    me.compute.wait_event(k)
                elif variant in ("gemms_wait", "gemms_signal"):  # the cost of each side's flag alone
                    me.ready.fill_(1)
                    me.done.zero_()
                    gemms(me, wait=variant == "gemms_wait", signal=variant == "gemms_signal")
                elif variant == "gemms_flagged":  # the spin and the counters alone: every expert ready
                    me.ready.fill_(1)
                    me.done.zero_()
                    gemms(me, wait=True, signal=True)
                elif variant in ("flags", "flags_copyflag", "flags_dispatch_only", "flags_combine_only"):
                    flag_dispatch = variant != "flags_combine_only"
                    flag_combine = variant != "flags_dispatch_only"
                    me.ready.zero_()
                    me.done.zero_()
                    z = torch.cuda.Event()
                    z.record()
                    me.dispatch.wait_event(z)
                    me.combine.wait_event(z)
                    # every pull and flag is queued BEFORE the spinning GEMM is launched: a host call that blocks
                    # until the device idles (the first launch of a kernel loads its module) would otherwise
                    # deadlock with a spin whose producer the host has not issued yet. Raw pointers keep the
                    # host's issue time (the GEMM's late start) short.
                    cpy, wv = _driver("cuMemcpyAsync"), _driver("cuStreamWriteValue32")
                    st_d = ctypes.c_void_p((me.dispatch if flag_dispatch else me.compute).cuda_stream)
                    for e in range(E_L):
                        for dst, src, nb in me.pull_plan[e]:
                            cpy(dst, src, nb, st_d)
                        mark(d, f"pulled {e}", me.dispatch)
                        if variant == "flags_copyflag":
                            copy(me.dispatch, me.ready[e:e + 1], devs[1 - d].one)
                        elif flag_dispatch:
                            wv(st_d, me.ready_ptrs[e], 1, 0)
                    gemms(me, wait=flag_dispatch, signal=flag_combine)
                    mark(d, "gemms done", me.compute)
                    for e in range(E_L):
                        if flag_combine:
                            wait_value_geq(me.combine, me.done[e:e + 1], me.tiles[e])
                            mark(d, f"done {e}", me.combine)
                        push(devs, d, e, me.combine if flag_combine else me.compute)
                        mark(d, f"pushed {e}", me.combine if flag_combine else me.compute)
                    j = torch.cuda.Event()
                    j.record(me.combine)
                    me.compute.wait_event(j)
                    # the pulls must be done before the next call overwrites recv
                    k = torch.cuda.Event()
                    k.record(me.dispatch)
                    me.compute.wait_event(k)
                else:
                    raise ValueError(variant)
                en.record()
            evs.append((st, en))
    return evs


def sync(devs):
    for me in devs:
        torch.cuda.synchronize(me.dev)


T0 = time.time()


def main():
    out_path = sys.argv[1]
    Ts = [int(t) for t in sys.argv[2:]] or [4096, 16384]
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "W": W, "E_local": E_L, "Hd": HD, "F": F, "rows": []}
    for i in range(W):
        for j in range(W):
            if i != j:
                assert torch.cuda.can_device_access_peer(i, j), "no peer access"
                # a torch cross-device copy enables peer access between the primary contexts
                torch.ones(1, device=f"cuda:{i}").copy_(torch.ones(1, device=f"cuda:{j}"))
    for T in Ts:
        R = T * 2 // (E_L * W)  # rows per (source, expert): T tokens x top-2 over 32 experts
        devs = [Dev(d, R) for d in range(W)]
        for me in devs:
            me.pull_plan = [[(me.recv_block(e, s).data_ptr(), devs[s].send_block(me.d, e).data_ptr(),
                              me.recv_block(e, s).nbytes) for s in range(W) if s != me.d] for e in range(E_L)]
            me.ready_ptrs = [me.ready[e:e + 1].data_ptr() for e in range(E_L)]
        row = {"T": T, "R": R, "cfg_up": devs[0].cfg_up, "cfg_down": devs[0].cfg_dn}
        print(f"[{time.time() - T0:7.1f} s] T={T}: inputs ready", file=sys.stderr, flush=True)
        # correctness: flags vs serial, bit for bit, on both devices
        outs = {}
        for variant in ("serial", "flags", "flags_copyflag", "flags_dispatch_only", "flags_combine_only"):
            for me in devs:
                me.ybuf.fill_(float("nan"))
                me.recv.fill_(float("nan"))
                me.y.fill_(float("nan"))
            try:
                t0 = time.time()
                run(devs, variant)
                sync(devs)
                print(f"[{time.time() - T0:7.1f} s] T={T} first {variant}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
                outs[variant] = [torch.cat([me.y, me.ybuf]).nan_to_num(7.0) for me in devs]
                row.setdefault("nans_y_recv_ybufpeer", {})[variant] = [
                    [int(torch.isnan(me.y).sum()), int(torch.isnan(me.recv.view(E_L, W, -1)[:, 1 - me.d]).sum()),
                     int(torch.isnan(torch.cat([me.ybuf_block(1 - me.d, e) for e in range(E_L)])).sum())]
                    for me in devs]
            except Exception as exc:  # noqa: BLE001 - a probe reports what failed
                row[f"{variant}_error"] = repr(exc)[:400]
        row["equal"] = {v: all(torch.equal(a, b) for a, b in zip(outs[v], outs["serial"]))
                        for v in outs if v != "serial"}
        row["nan_free"] = not any(torch.isnan(me.y).any().item() or torch.isnan(
            torch.cat([me.ybuf_block(q, e) for q in range(W) if q != me.d for e in range(E_L)])).any().item()
            for me in devs)  # after the last variant
        print(json.dumps(row), flush=True)
        flagged = ("flags", "flags_copyflag", "flags_dispatch_only", "flags_combine_only")
        variants = ["gemms", "gemms_wait", "gemms_signal", "gemms_flagged", "pulls", "pushes", "serial", "concurrent"] + [v for v in flagged if row["equal"].get(v)]
        for rnd in range(2):  # warm-up, each variant synchronised and its host time printed
            for v in variants:
                t0 = time.time()
                run(devs, v)
                sync(devs)
                print(f"[{time.time() - T0:7.1f} s] T={T} warm-up {rnd} {v}: {1e3 * (time.time() - t0):.1f} ms", file=sys.stderr, flush=True)
        times = {v: [] for v in variants}
        for _ in range(7):
            for v in variants:
                evs = run(devs, v)
                sync(devs)
                times[v].append(max(s.elapsed_time(e) for s, e in evs))
        row["ms"] = {v: round(statistics.median(t), 4) for v, t in times.items()}
        row["p20_p80"] = {v: [round(x, 4) for x in statistics.quantiles(t, n=5)[::3]] for v, t in times.items()}
        comm = row["ms"]["pulls"] + row["ms"]["pushes"]
        for v in flagged:
            if v in row["ms"]:
                row[f"hidden_{v}"] = round((row["ms"]["serial"] - row["ms"][v]) / comm, 3)
                row[f"{v}_over_gemms"] = round(row["ms"][v] / row["ms"]["gemms"], 4)
        global TIMELINE
        TIMELINE = []
        run(devs, "flags")
        sync(devs)
        starts = {d: ev for d, label, ev in TIMELINE if label == "start"}
        row["timeline_flags_ms"] = [[d, label, round(starts[d].elapsed_time(ev), 3)] for d, label, ev in TIMELINE
                                    if label != "start"]
        TIMELINE = None
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        del devs
        torch.cuda.empty_cache()
    json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
