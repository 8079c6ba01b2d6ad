"""End-to-end benchmarks of the hybrid decoder's layers: the shape of MiniMax-01's speed figures.

    python -m model.bench                       # bench config (MiniMax layer sizes), one GPU
    python -m model.bench --config tiny --cpu   # the pipeline through the interpreter (meaningless times)

What is measured, and how the stacks are composed:

- ``train``: one training step (forward, then backward of a random output gradient, parameter
  gradients set to None between steps) of ONE layer of each kind at MiniMax's sizes, B=1,
  T tokens. An 8-layer stack's step is composed from them: hybrid = 7 lightning + 1 softmax
  layers, all-softmax = 8 softmax layers (a bench-sized 8-layer stack holds 8 x 5.4B expert
  parameters: it does not fit one 80 GB GPU with its gradients, so the layers are timed one at
  a time; embedding and LM head are left out of both). tokens/s = T / stack time. MFU =
  counted FLOPs of the step / time / the same run's dense bf16 matmul rate.
- ``prefill``: the attention sublayer alone (no MoE), forward, no grad: lightning vs softmax
  (SDPA, causal), T doubling up to ``--prefill-max`` or the first out-of-memory.
- ``decode``: one token through the attention sublayer at batch B after a context of C tokens:
  lightning (the in-place decode step on the fp32 state) vs softmax over a preallocated KV
  cache of C + 1 slots (the new token's key and value written into its slot, then SDPA over
  all of them, no mask: the same work as the model's ``KVCache.append`` path without the
  buffer doubling).

Results: ``<results>/model_train.jsonl``, ``model_prefill.jsonl``, ``model_decode.jsonl`` (one
schema, ``profiling.results``), each line with the composition in ``extra``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from model.config import LIGHTNING, SOFTMAX, ModelConfig, get_config


# A call longer than this (a softmax prefill at 512K tokens takes seconds) is timed 3 times
# after the first call instead of profiling.bench's 16 calls
LONG_CALL_MS = 500.0


def _timer(cpu: bool):
    """``ms(fn) -> (median, p20, p80)``: profiling.bench on a GPU (CUDA events, the GPU kept
    busy ahead of each call), or 3 timed calls for one that takes over LONG_CALL_MS; one
    wall-clock call after a warm-up on the CPU."""
    if not cpu:
        from profiling import bench, bench_fixed

        def cuda(fn):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()  # compiles, allocates, and tells a long call from a short one
            torch.cuda.synchronize()
            if (time.perf_counter() - start) * 1e3 > LONG_CALL_MS:
                t = bench_fixed(lambda i: fn(), warmup=0, iters=3)
            else:
                t = bench(lambda i: fn(), warmup_ms=10, rep_ms=50)
            return (t.median_ms, t.p20_ms, t.p80_ms)

        return cuda

    def wall(fn):
        fn()
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return (ms, ms, ms)

    return wall


def _sum(parts: list[tuple[int, tuple[float, float, float]]]) -> tuple[float, float, float]:
    """``sum(n * t)`` per statistic: a composed stack's median, p20 and p80 (the last two are
    sums of the layers' quantiles: a spread indicator, not the quantiles of the sum)."""
    return tuple(sum(n * t[i] for n, t in parts) for i in range(3))


def layer_flops(config: ModelConfig, kind: str, T: int) -> int:
    """Forward FLOPs of one layer over T tokens (B=1): every matmul 2*m*n*k; lightning's
    recurrence 4*H*D*D per token; causal softmax attention 2*2*H*D*T/2 per token (QK^T and PV
    over half the keys on average). A training step counts 3x (backward = 2x forward)."""
    c = config
    inner, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    moe = c.hidden_size * c.num_experts + c.top_k * (c.hidden_size * 2 * c.expert_hidden_size + c.expert_hidden_size * c.hidden_size)
    if kind == LIGHTNING:
        proj = c.hidden_size * 3 * inner + c.hidden_size * inner + inner * c.hidden_size
        core = 2 * c.num_heads * c.head_dim * c.head_dim  # 4*H*D*E / 2 (per-token multiply-adds)
    else:
        proj = c.hidden_size * inner + 2 * c.hidden_size * kv + inner * c.hidden_size
        core = c.num_heads * c.head_dim * T  # 2 matmuls x T/2 keys, in multiply-adds
    return 2 * T * (proj + moe + core)


def matmul_tflops(cpu: bool) -> float | None:
    """The dense bf16 matmul rate of this GPU, measured now (8192^3, median)."""
    if cpu:
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = _timer(False)(lambda: a @ b)[0]
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def _layer(config: ModelConfig, kind: str, device: str, dtype: torch.dtype):
    from model.decoder import DecoderLayer

    index = 0 if kind == LIGHTNING else config.softmax_every - 1
    layer = DecoderLayer(config, index, "kernels", device=device, dtype=dtype)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, config.init_std) if p.dim() > 1 else torch.nn.init.ones_(p)
    return layer


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def bench_train(config, seqs, device, dtype, ms) -> Iterator[dict]:
    """Yields ``{"T", "lightning": (med, p20, p80), "softmax": ...}`` per T until the first
    out-of-memory. One layer lives at a time: a bench-sized layer holds 5.4B expert
    parameters (10.9 GB in bf16, as much again for their gradients), so keeping both kinds
    alive would halve the longest sequence that fits."""
    for T in seqs:
        row = {"T": T}
        try:
            for kind in (LIGHTNING, SOFTMAX):
                layer = _layer(config, kind, device, dtype)
                params = list(layer.parameters())
                x = torch.randn(1, T, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
                dout = torch.randn_like(x)

                def step(layer=layer, x=x, dout=dout, params=params):
                    for p in params:
                        p.grad = None
                    layer(x).backward(dout)

                row[kind] = ms(step)
                del layer, params, x, dout, step
                _free(device)
        except Exception as exc:  # noqa: BLE001 - out of memory ends the sweep, anything else is raised
            if not _oom(exc):
                raise
            print(f"train T={T}: out of memory, stopping", flush=True)
            return
        yield row


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_prefill(config, seqs, device, dtype, ms, max_call_ms: float = float("inf")) -> Iterator[dict]:
    """Yields ``{"T", "lightning": (med, p20, p80) or None, "softmax": ...}`` per T (None: out
    of memory, or not timed because this kind's call at a shorter T already took over
    ``max_call_ms``) until neither kind is left."""
    attn = {kind: _layer(config, kind, device, dtype).attn for kind in (LIGHTNING, SOFTMAX)}
    stopped: set[str] = set()
    for T in seqs:
        row = {"T": T}
        for kind, module in attn.items():
            if kind in stopped:
                row[kind] = None
                continue
            try:
                x = torch.randn(1, T, config.hidden_size, device=device, dtype=dtype)
                with torch.no_grad():
                    row[kind] = ms(lambda: module(x))
                del x
            except Exception as exc:  # noqa: BLE001
                if not _oom(exc):
                    raise
                row[kind] = None
                print(f"prefill {kind} T={T}: out of memory", flush=True)
            if row[kind] is None or row[kind][0] > max_call_ms:
                if row[kind] is not None:
                    print(f"prefill {kind}: {row[kind][0] / 1e3:.1f} s per call at T={T}; longer T not timed "
                          "(--max-call-s)", flush=True)
                stopped.add(kind)
            _free(device)
        yield row
        if stopped == set(attn):
            return


def _softmax_decode(attn, x, k_cache, v_cache, pos: int):
    """One token through the softmax sublayer over a preallocated KV cache (slot ``pos``)."""
    import torch.nn.functional as F

    from model.attention import rotary

    B = x.shape[0]
    positions = torch.tensor([pos], device=x.device)
    q = rotary(attn.q_proj(x).view(B, 1, attn.num_heads, attn.head_dim), positions, attn.rotary_dim, attn.rope_theta)
    k_cache[:, pos:pos + 1] = rotary(attn.k_proj(x).view(B, 1, attn.num_kv_heads, attn.head_dim), positions,
                                      attn.rotary_dim, attn.rope_theta)
    v_cache[:, pos:pos + 1] = attn.v_proj(x).view(B, 1, attn.num_kv_heads, attn.head_dim)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :pos + 1].transpose(1, 2),
                                       v_cache[:, :pos + 1].transpose(1, 2), enable_gqa=True)
    return attn.o_proj(o.transpose(1, 2).reshape(B, 1, attn.num_heads * attn.head_dim))


def bench_decode(config, batches, context, device, dtype, ms) -> Iterator[dict]:
    """Yields ``{"B", "lightning": (med, p20, p80), "softmax": ...}`` per batch size."""
    from model.cache import LightningState

    attn = {kind: _layer(config, kind, device, dtype).attn for kind in (LIGHTNING, SOFTMAX)}
    c = config
    for B in batches:
        x = torch.randn(B, 1, c.hidden_size, device=device, dtype=dtype)
        state = LightningState(torch.randn(B, c.num_heads, c.head_dim, c.head_dim, device=device) * 0.01)
        kv = [torch.randn(B, context + 1, c.num_kv_heads, c.head_dim, device=device, dtype=dtype) for _ in range(2)]
        with torch.no_grad():
            row = {"B": B, LIGHTNING: ms(lambda: attn[LIGHTNING](x, state)),
                   SOFTMAX: ms(lambda: _softmax_decode(attn[SOFTMAX], x, *kv, context))}
        del x, state, kv
        yield row


def _records(config, train, prefill, decode, context, tflops, cpu) -> dict[str, list]:
    from profiling import Record, gpu_identity, versions

    identity = None if cpu else gpu_identity(0)
    common = dict(gpu={"name": identity.name, "slug": identity.slug, "driver": identity.driver} if identity else {},
                  versions=versions(), telemetry={}, floor_ms=None, bytes=None)
    dims = {"hidden": config.hidden_size, "H": config.num_heads, "D": config.head_dim, "E_experts": config.num_experts,
            "F": config.expert_hidden_size, "top_k": config.top_k}
    dtype = "float32" if cpu else "bfloat16"
    out: dict[str, list] = {"model_train": [], "model_prefill": [], "model_decode": []}
    for row in train:
        T, L, S = row["T"], row[LIGHTNING], row[SOFTMAX]
        for provider, parts, layers in (("hybrid", [(7, L), (1, S)], "7 lightning + 1 softmax"),
                                        ("softmax", [(8, S)], "8 softmax")):
            med, p20, p80 = _sum(parts)
            flops = 3 * sum(n * layer_flops(config, LIGHTNING if t is L else SOFTMAX, T) for n, t in parts)
            extra = {"layers": layers, "lightning_layer_ms": L[0], "softmax_layer_ms": S[0], "tokens_per_s": T / (med * 1e-3),
                     "mfu": flops / (med * 1e-3) / (tflops * 1e12) if tflops else None, "matmul_tflops": tflops,
                     "composed_from_single_layers": True, "timing_meaningful": not cpu}
            out["model_train"].append(Record(kernel="model_train", provider=provider, mode="fwd_bwd",
                                             shape={**dims, "B": 1, "T": T}, dtype=dtype, config={}, median_ms=med,
                                             p20_ms=p20, p80_ms=p80, flops=flops, x_name="T", x_value=T, extra=extra,
                                             **common))
    for row in prefill:
        for kind in (LIGHTNING, SOFTMAX):
            if row[kind] is not None:
                med, p20, p80 = row[kind]
                out["model_prefill"].append(Record(kernel="model_prefill", provider=kind, mode="fwd",
                                                   shape={**dims, "B": 1, "T": row["T"]}, dtype=dtype, config={},
                                                   median_ms=med, p20_ms=p20, p80_ms=p80, flops=None, x_name="T",
                                                   x_value=row["T"], extra={"sublayer": "attention",
                                                                            "timing_meaningful": not cpu}, **common))
    for row in decode:
        for kind in (LIGHTNING, SOFTMAX):
            med, p20, p80 = row[kind]
            out["model_decode"].append(Record(
                kernel="model_decode", provider=kind, mode="decode", shape={**dims, "B": row["B"], "context": context},
                dtype=dtype, config={}, median_ms=med, p20_ms=p20, p80_ms=p80, flops=None, x_name="B", x_value=row["B"],
                extra={"tokens_per_s": row["B"] / (med * 1e-3), "sublayer": "attention",
                       "timing_meaningful": not cpu}, **common))
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench", help="model config whose layer sizes to use")
    parser.add_argument("--train-seq", type=_ints, default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--prefill-seq", type=_ints, default=[2**p for p in range(12, 21)], help="up to 1M")
    parser.add_argument("--decode-batch", type=_ints, default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=32768, help="tokens before the decoded one")
    parser.add_argument("--max-call-s", type=float, default=5.0,
                        help="prefill: stop timing a kind at longer T once one call takes longer than this")
    parser.add_argument("--results", default="results")
    parser.add_argument("--cpu", action="store_true", help="Triton interpreter on the CPU (meaningless times)")
    args = parser.parse_args(argv)
    if args.cpu and os.environ.get("TRITON_INTERPRET") != "1":
        # triton reads TRITON_INTERPRET when imported, and importing the model package
        # (python -m model.bench) already imported it: start again with it set
        os.execve(sys.executable, [sys.executable, "-m", "model.bench", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    if not args.cpu and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --cpu with a tiny config)")
    config = replace(get_config(args.config), num_layers=8)
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    ms = _timer(args.cpu)
    tflops = matmul_tflops(args.cpu)
    from profiling import append_records

    # each measurement is written and printed as soon as it is taken: a run that is killed
    # (a time limit, a lost machine) keeps everything measured before
    sections = {
        "train": bench_train(config, args.train_seq, device, dtype, ms),
        "prefill": bench_prefill(config, args.prefill_seq, device, dtype, ms, args.max_call_s * 1e3),
        "decode": bench_decode(config, args.decode_batch, args.context, device, dtype, ms),
    }
    for section, rows in sections.items():
        for row in rows:
            parts = {name: [row] if name == section else [] for name in sections}
            for kernel, records in _records(config, **parts, context=args.context, tflops=tflops, cpu=args.cpu).items():
                if records:
                    append_records(records, Path(args.results) / f"{kernel}.jsonl")
                for r in records:
                    e = r.extra
                    rate = f"{e['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in e else ""
                    mfu = f" MFU {100 * e['mfu']:.1f}%" if e.get("mfu") else ""
                    print(f"{kernel:14s} {r.provider:9s} {r.x_name}={r.x_value:<8} {r.median_ms:10.3f} ms {rate}{mfu}",
                          flush=True)
    if args.cpu:
        print("Triton interpreter on the CPU: timings are meaningless", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
