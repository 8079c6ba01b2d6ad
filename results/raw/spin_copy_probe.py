"""Probe: do copies make progress while a spinning grid owns every SM of the GPU?

A Triton kernel whose programs (many more than fit) spin on flag[0] (ld.acquire) is launched on
stream K of device 0. Then on stream D of device 0: a copy (case), an event, and
cuStreamWriteValue32(flag, 1). The host polls the copy's event for 3 s; if it has not completed,
the case is 'stuck' and a third stream writes the flag (a memop, no SM) to release the spin.
Cases: peer pull (dst dev0, src dev1), peer push (dst dev1, src dev0), local D2D on dev0,
cuMemcpyPeerAsync pull, none (the memop alone).
"""
import ctypes
import json
import sys
import time

import torch
import triton
import triton.language as tl


@triton.jit
def spin(flag, out):
    f = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [flag], dtype=tl.int32,
                                  is_pure=False, pack=1)
    while f == 0:
        f = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [flag], dtype=tl.int32,
                                      is_pure=False, pack=1)
    tl.store(out + tl.program_id(0), f)


lib = ctypes.CDLL("libcuda.so.1")
memcpy = lib.cuMemcpyAsync
memcpy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
memcpy_peer = lib.cuMemcpyPeerAsync
memcpy_peer.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p]
write_value = getattr(lib, "cuStreamWriteValue32_v2", None) or lib.cuStreamWriteValue32
write_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
get_ctx = lib.cuCtxGetCurrent
get_ctx.argtypes = [ctypes.POINTER(ctypes.c_void_p)]


def ctx_of(d):
    with torch.cuda.device(d):
        torch.cuda.current_stream().synchronize()
        c = ctypes.c_void_p()
        assert get_ctx(ctypes.byref(c)) == 0
        return c


def main():
    torch.ones(1, device="cuda:0").copy_(torch.ones(1, device="cuda:1"))
    torch.ones(1, device="cuda:1").copy_(torch.ones(1, device="cuda:0"))
    ctx0, ctx1 = ctx_of(0), ctx_of(1)
    n = 64 << 20
    a0 = torch.ones(n, device="cuda:0", dtype=torch.uint8)
    b0 = torch.empty(n, device="cuda:0", dtype=torch.uint8)
    a1 = torch.ones(n, device="cuda:1", dtype=torch.uint8)
    flag = torch.zeros(1, device="cuda:0", dtype=torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(sms * 64, device="cuda:0", dtype=torch.int32)
    K, D, X = (torch.cuda.Stream("cuda:0") for _ in range(3))
    res = {"gpu": torch.cuda.get_device_name(0), "sms": sms, "cases": {}}
    cases = {
        "peer_pull": lambda s: memcpy(b0.data_ptr(), a1.data_ptr(), n, ctypes.c_void_p(s.cuda_stream)),
        "peer_push": lambda s: memcpy(a1.data_ptr(), b0.data_ptr(), n, ctypes.c_void_p(s.cuda_stream)),
        "local": lambda s: memcpy(b0.data_ptr(), a0.data_ptr(), n, ctypes.c_void_p(s.cuda_stream)),
        "peer_pull_cuMemcpyPeerAsync": lambda s: memcpy_peer(b0.data_ptr(), ctx0, a1.data_ptr(), ctx1, n,
                                                             ctypes.c_void_p(s.cuda_stream)),
        "none": lambda s: 0,
    }
    with torch.cuda.device(0):
        flag.fill_(1)
        spin[(out.numel(),)](flag, out, num_warps=4)  # compile and warm (flag set first)
        for name, issue in cases.items():
            torch.cuda.synchronize()
            flag.zero_()
            out.zero_()
            torch.cuda.synchronize()
            with torch.cuda.stream(K):
                spin[(out.numel(),)](flag, out, num_warps=4)
            time.sleep(0.05)  # the grid is resident and spinning
            print(name, "issuing", flush=True)
            t0 = time.time()
            rc = issue(D)
            copied = torch.cuda.Event()
            copied.record(D)
            t_issue = time.time() - t0
            write_value(ctypes.c_void_p(D.cuda_stream), flag.data_ptr(), 1, 0)
            while not copied.query() and time.time() - t0 < 3.0:
                time.sleep(0.001)
            done = copied.query()
            t_done = time.time() - t0
            if not done:
                write_value(ctypes.c_void_p(X.cuda_stream), flag.data_ptr(), 1, 0)
            torch.cuda.synchronize()
            res["cases"][name] = {"rc": rc, "completed_under_spin": done, "host_issue_ms": round(1e3 * t_issue, 3),
                                  "wait_ms": round(1e3 * t_done, 3), "spin_released": bool((out == 1).all())}
            print(name, res["cases"][name], flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)


main()
