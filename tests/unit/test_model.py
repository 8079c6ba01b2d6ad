"""model/: the hybrid decoder on the kernels vs on the references, prefill + decode vs one
forward, input checks, and the kernel plan (Triton interpreter on CPU, tiny config, fp32).

Every launch costs the interpreter ~0.1 s per program whatever its size, so each test runs
the 8-layer tiny model as few times as it can; the whole file takes about a minute and a half.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import triton

import model.impl
from kernels import _config
from kernels.lightning_attn import forward as lightning_fwd
from model import LIGHTNING, SOFTMAX, Cache, HybridDecoder, ModelConfig, get_config, kernel_plan
from model.norm import RMSNorm
from tests.helpers import TOLERANCE, assert_close

TINY = get_config("tiny")
TOL = TOLERANCE[torch.float32]


def random_model(impl: str, device) -> HybridDecoder:
    """The tiny model with fresh random weights (norm weights too, so none is all ones)."""
    m = HybridDecoder(TINY, impl=impl, device=device)
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return m


def random_ids(B: int, T: int, device) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (B, T), device=device)


@pytest.fixture
def lookups(monkeypatch):
    """Record every (kernel, bucket, config) the kernels look up while the test runs."""
    seen: set[tuple] = set()
    lookup = _config.lookup

    def recording(kernel, key, **kwargs):
        config = lookup(kernel, key, **kwargs)
        seen.add(_freeze(kernel, key, config))
        return config

    monkeypatch.setattr(_config, "lookup", recording)
    return seen


def _freeze(kernel: str, key: dict, config: dict) -> tuple:
    return kernel, tuple(sorted(key.items())), tuple(sorted(config.items()))


def planned(batch: int, seq_len: int, phases: tuple[str, ...]) -> set[tuple]:
    """What kernel_plan says the tiny fp32 model looks up (SDPA rows have no lookup)."""
    rows = kernel_plan(TINY, batch, seq_len, dtype=torch.float32, phases=phases)
    return {_freeze(r.kernel, r.key, r.config) for r in rows if r.config_file is not None}


def test_kernels_equal_reference_logits_and_every_gradient(device, lookups):
    """Same weights (state_dict) in both implementations: logits and the gradient of every
    parameter agree to fp32 tolerance (the reference computes lightning attention and the MoE
    in float64). The launches made are exactly the plan's prefill + backward rows."""
    B, T = 2, 20
    kern = random_model("kernels", device)
    ref = HybridDecoder(TINY, impl="reference", device=device)
    ref.load_state_dict(kern.state_dict())
    ids = random_ids(B, T, device)
    logits, cache = kern(ids)
    want, _ = ref(ids)
    assert cache is None and logits.shape == (B, T, TINY.vocab_size) and logits.dtype == torch.float32
    assert_close("logits", logits, want, TOL)

    probe = torch.randn_like(want)
    (logits * probe).sum().backward()
    (want * probe).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in kern.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
        assert_close(f"grad {name}", p.grad, ref_params[name].grad, TOL)
    assert lookups == planned(B, T, ("prefill", "backward"))


@pytest.mark.parametrize("impl", ["kernels", "reference"])
def test_prefill_then_decode_equals_one_forward(impl, device, lookups):
    """Prefill T0 tokens, a second chunk of 3 (lightning from the cached state, softmax over
    cached keys with the offset causal mask), then one token at a time (the decode step):
    the logits of every position match one forward over the whole sequence."""
    B, T, T0, T1 = 2, 10, 4, 7
    m = random_model(impl, device)
    ids = random_ids(B, T, device)
    with torch.no_grad():
        want, _ = m(ids)
        pieces, cache = m(ids[:, :T0], use_cache=True)
        pieces = [pieces]
        logits, same = m(ids[:, T0:T1], cache=cache, use_cache=True)
        assert same is cache
        pieces.append(logits)
        for t in range(T1, T):
            pieces.append(m(ids[:, t:t + 1], cache=cache, use_cache=True)[0])
    assert cache.seq_len == T
    assert_close("logits", torch.cat(pieces, dim=1), want, TOL)
    if impl == "kernels":
        expected = set().union(*(planned(B, n, ("prefill",)) for n in (T, T0, T1 - T0)), planned(B, 1, ("decode",)))
        assert lookups == expected


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any kernel or reference op runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel launched before the inputs were checked")

    for name in ("lightning_attn", "lightning_decode", "moe_ffn", "lightning_attn_ref", "lightning_decode_ref", "moe_ffn_ref"):
        monkeypatch.setattr(model.impl, name, refuse)


def _other_config_cache(m: HybridDecoder, ids: torch.Tensor) -> Cache:
    return Cache.new(dataclasses.replace(TINY, num_layers=4), ids.shape[0], device=ids.device, dtype=torch.float32)


def _cache_with_wrong_length(m: HybridDecoder, ids: torch.Tensor) -> Cache:
    cache = m.new_cache(ids.shape[0])
    cache.seq_len = 5  # the softmax layer's keys hold 0 tokens
    return cache


BAD_CALLS = {
    "float-ids": (lambda m, ids: m(ids.float()), TypeError, "input_ids"),
    "list-ids": (lambda m, ids: m(ids.tolist()), TypeError, "input_ids"),
    "1d-ids": (lambda m, ids: m(ids[0]), ValueError, "input_ids"),
    "empty-ids": (lambda m, ids: m(ids[:, :0]), ValueError, "input_ids"),
    "id-too-large": (lambda m, ids: m(ids + TINY.vocab_size), ValueError, "input_ids"),
    "negative-id": (lambda m, ids: m(ids - TINY.vocab_size), ValueError, "input_ids"),
    "use_cache-not-bool": (lambda m, ids: m(ids, use_cache=1), TypeError, "use_cache"),
    "cache-without-use_cache": (lambda m, ids: m(ids, cache=m.new_cache(2)), ValueError, "use_cache"),
    "cache-not-a-Cache": (lambda m, ids: m(ids, cache={}, use_cache=True), TypeError, "cache"),
    "cache-other-batch": (lambda m, ids: m(ids, cache=m.new_cache(3), use_cache=True), ValueError, "cache"),
    "cache-other-config": (lambda m, ids: m(ids, cache=_other_config_cache(m, ids), use_cache=True), ValueError, "cache"),
    "cache-seq_len-mismatch": (lambda m, ids: m(ids, cache=_cache_with_wrong_length(m, ids), use_cache=True), ValueError, "cache"),
    "cache-other-dtype": (
        lambda m, ids: m(ids, cache=Cache.new(TINY, 2, device=ids.device, dtype=torch.float64), use_cache=True),
        ValueError, "cache",
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_forward_inputs_raise_before_any_launch(case, device, no_launch):
    call, error, name = BAD_CALLS[case]
    m = HybridDecoder(TINY, device=device)
    with pytest.raises(error, match=name):
        call(m, random_ids(2, 5, device))


BAD_CONFIGS = {
    "head_dim": dict(head_dim=24),
    "num_kv_heads": dict(num_kv_heads=3),
    "top_k": dict(top_k=5),
    "rotary_dim": dict(rotary_dim=7),
    "hidden_size": dict(hidden_size=0),
    "num_layers": dict(num_layers=2.5),
    "rope_theta": dict(rope_theta=-1.0),
    "attn_alpha": dict(attn_alpha=float("nan")),
}


@pytest.mark.parametrize("field", BAD_CONFIGS)
def test_bad_config_fields(field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **BAD_CONFIGS[field])


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model config 'minimax'.*minimax-text-01, bench, tiny"):
        get_config("minimax")
    with pytest.raises(ValueError, match="unknown model config"):
        HybridDecoder("minimax")
    with pytest.raises(ValueError, match="unknown model config"):
        kernel_plan("minimax", 1, 16)
    with pytest.raises(ValueError, match="impl"):
        HybridDecoder(TINY, impl="triton")
    with pytest.raises(TypeError, match="config"):
        HybridDecoder(42)


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch=0, seq_len=16), "batch"),
    (dict(batch=1, seq_len="16"), "seq_len"),
    (dict(batch=1, seq_len=16, phases=("train",)), "phases"),
])
def test_kernel_plan_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        kernel_plan(TINY, **kwargs)


def test_configs_follow_minimax_text_01():
    mm = get_config("minimax-text-01")
    assert (mm.hidden_size, mm.num_heads, mm.head_dim, mm.num_kv_heads) == (6144, 64, 128, 8)
    assert (mm.num_experts, mm.top_k, mm.expert_hidden_size, mm.num_layers, mm.vocab_size) == (32, 2, 9216, 80, 200064)
    assert (mm.rotary_dim, mm.rope_theta) == (64, 1e7)
    assert mm.attn_alpha == mm.mlp_alpha == pytest.approx(3.5565588200778455)  # MiniMax-Text-01's config.json
    bench = get_config("bench")
    assert dataclasses.replace(bench, name=mm.name, num_layers=mm.num_layers) == mm
    for config in (mm, bench, TINY):
        kinds = config.layer_kinds
        assert kinds.count(SOFTMAX) == config.num_layers // 8
        assert all(kind == (SOFTMAX if i % 8 == 7 else LIGHTNING) for i, kind in enumerate(kinds))


def test_kernel_plan_lists_every_layer_and_kernel():
    rows = kernel_plan("minimax-text-01", batch=1, seq_len=4096, phases=("prefill", "decode", "backward"))
    by_layer: dict[int, list] = {}
    for r in rows:
        by_layer.setdefault(r.layer, []).append(r)
    assert sorted(by_layer) == list(range(80))
    moe = {"grouped_gemm_swiglu", "grouped_gemm", "grouped_gemm_dx", "grouped_gemm_dw"}
    for layer, layer_rows in by_layer.items():
        kind = SOFTMAX if layer % 8 == 7 else LIGHTNING
        assert {r.kind for r in layer_rows} == {kind}
        attention = {"lightning_attn_fwd", "lightning_decode", "lightning_attn_bwd"} if kind == LIGHTNING else {"torch.sdpa"}
        assert {r.kernel for r in layer_rows} == attention | moe
        assert len(layer_rows) == 3 + 2 + 2 + 4  # attention per phase; MoE GEMMs: prefill 2, decode 2, backward 4
    fwd = next(r for r in rows if r.kernel == lightning_fwd.KERNEL)
    assert fwd.key == lightning_fwd.bucket_key(128, 128, 4096, torch.bfloat16)
    up = next(r for r in rows if r.phase == "decode" and r.op.startswith("moe x @ w_gate_up"))
    assert (up.key["E"], up.key["N"], up.key["K"], up.key["M"]) == (32, 2 * 9216, 6144, 2)
    assert len(kernel_plan("minimax-text-01", 1, 4096)) == 80 * (2 + 4)  # default phases: prefill, decode


def _write_config(kernel: str, entries: list[tuple[dict, dict]], *, triton_version: str = triton.__version__) -> None:
    path = _config.config_path(kernel, "test-gpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"triton": triton_version}
    path.write_text(json.dumps({"kernel": kernel, "meta": meta, "entries": [{"key": k, "config": c} for k, c in entries]}))


@pytest.mark.filterwarnings("ignore:kwb:RuntimeWarning")  # the lookup's fallbacks warn; the rows report them
def test_kernel_plan_reads_tuned_files_like_the_kernels(config_dir):
    """A tuned entry is used (nearest T bucket), an entry the kernel could not launch is
    replaced by the default, a stale file is reported and ignored, a missing one reported."""
    bench = get_config("bench")
    tuned = {"BT": 32, "BV": 32, "num_warps": 2, "num_stages": 2}
    _write_config("lightning_attn_fwd", [(lightning_fwd.bucket_key(128, 128, 8192, torch.bfloat16), tuned)])
    M = 2 * 3000
    up_key = {"E": 32, "N": 2 * 9216, "K": 6144, "dtype": "bfloat16", "M": triton.next_power_of_2(M)}
    one_stage = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    _write_config("grouped_gemm", [(up_key, one_stage)])
    _write_config("lightning_decode", [({"D": 128, "E": 128, "B": 1}, {"backend": "triton", "BV": 16, "num_warps": 2})],
                  triton_version="2.0.0")
    rows = kernel_plan(bench, batch=1, seq_len=3000, slug="test-gpu")

    fwd = [r for r in rows if r.kernel == "lightning_attn_fwd"]
    assert len(fwd) == 7 and all(r.file_status == "ok" and r.config == tuned and r.tuned for r in fwd)
    assert fwd[0].key["T"] == 4096 and fwd[0].config_file == str(config_dir / "test-gpu" / "lightning_attn_fwd.json")
    up = [r for r in rows if r.phase == "prefill" and r.op.startswith("moe x @ w_gate_up")]
    assert len(up) == 8 and all(r.key == up_key and r.config["num_stages"] >= 2 and not r.tuned for r in up)  # the default
    decode = [r for r in rows if r.kernel == "lightning_decode"]
    assert all(r.file_status == "stale" and r.config["BV"] == 32 and not r.tuned for r in decode)
    down = [r for r in rows if r.op == "moe h @ w_down"]
    assert {r.file_status for r in down} == {"ok"}  # same file as the up projection; no entry for its N, K
    sdpa = [r for r in rows if r.kernel == "torch.sdpa"]
    assert [r.layer for r in sdpa] == [7, 7] and all(r.config_file is None for r in sdpa)


@pytest.mark.filterwarnings("ignore:kwb:RuntimeWarning")  # missing files fall back to the defaults
def test_kernel_plan_with_expert_parallelism(config_dir):
    """ep_size=4: a moe_ffn_ep schedule row per layer (forward phases only) keyed by W and the
    tokens per rank; the GEMM rows are one chunk's: E/W/C experts and M/C rows, with C from
    the tuned schedule. A bad ep_size raises."""
    from kernels.a2a_overlap import schedule

    ep_key = schedule.bucket_key(4, 32, 6144, 9216, 4096, torch.bfloat16)
    _write_config(schedule.KERNEL, [(ep_key, {"num_chunks": 2, "comm_ctas": 16})])
    rows = kernel_plan("bench", batch=1, seq_len=4096, phases=("prefill", "backward"), slug="test-gpu", ep_size=4)
    ep = [r for r in rows if r.kernel == schedule.KERNEL]
    assert len(ep) == 8 and all(r.phase == "prefill" and r.key == ep_key for r in ep)
    assert all(r.config == {"num_chunks": 2, "comm_ctas": 16} and r.tuned for r in ep)
    gemms = [r for r in rows if r.kernel.startswith("grouped_gemm")]
    assert len(gemms) == 8 * (2 + 4) and {(r.key["E"], r.key["M"]) for r in gemms} == {(32 // 4 // 2, 4096)}
    assert not any(r.tuned for r in gemms)  # no grouped-GEMM file here: the chunks run the default
    for bad in (3, 0, True):
        with pytest.raises(ValueError, match="ep_size"):
            kernel_plan("bench", batch=1, seq_len=16, ep_size=bad)


def test_softmax_every_sets_the_pattern():
    smaller = dataclasses.replace(TINY, num_layers=6, softmax_every=3)
    assert smaller.layer_kinds == (LIGHTNING, LIGHTNING, SOFTMAX) * 2
    assert isinstance(smaller, ModelConfig)


def test_bench_pipeline_composes_stacks_from_single_layers(tmp_path):
    """model.bench on the interpreter (meaningless times): every record is written, the
    stacks are composed as 7 lightning + 1 softmax and 8 softmax layers from the per-layer
    medians, and no MFU is claimed without a measured matmul rate."""
    from model import bench
    from profiling import read_results

    code = bench.main(["--config", "tiny", "--cpu", "--train-seq", "8", "--prefill-seq", "8", "--decode-batch", "2",
                       "--context", "5", "--results", str(tmp_path)])
    assert code == 0
    train, bad = read_results(tmp_path / "model_train.jsonl")
    assert not bad and sorted(r.provider for r in train) == ["hybrid", "softmax"]
    hybrid, softmax = sorted(train, key=lambda r: r.provider)
    L, S = hybrid.extra["lightning_layer_ms"], hybrid.extra["softmax_layer_ms"]
    assert hybrid.median_ms == pytest.approx(7 * L + S) and softmax.median_ms == pytest.approx(8 * S)
    assert hybrid.extra["mfu"] is None and hybrid.extra["timing_meaningful"] is False
    for kernel, n in (("model_prefill", 2), ("model_decode", 2)):
        records, bad = read_results(tmp_path / f"{kernel}.jsonl")
        assert not bad and len(records) == n and all(r.median_ms > 0 for r in records)


def test_bench_writes_each_measurement_as_it_is_taken(tmp_path, monkeypatch):
    """A run that dies part-way (here: the prefill section fails) keeps the train records it
    had measured: each row is appended before the next measurement starts."""
    from model import bench
    from profiling import read_results

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("lost the machine")
        yield  # a generator, like the real one

    monkeypatch.setattr(bench, "bench_prefill", failing_prefill)
    with pytest.raises(RuntimeError, match="lost the machine"):
        bench.main(["--config", "tiny", "--cpu", "--train-seq", "4,8", "--decode-batch", "2", "--context", "3",
                    "--results", str(tmp_path)])
    train, bad = read_results(tmp_path / "model_train.jsonl")
    assert not bad and sorted((r.x_value, r.provider) for r in train) == [
        (4, "hybrid"), (4, "softmax"), (8, "hybrid"), (8, "softmax")]
    assert not (tmp_path / "model_decode.jsonl").exists()


def test_bench_prefill_stops_a_kind_whose_call_is_too_long():
    """With a per-call limit of 0 ms every kind stops after its first T: one row, no more."""
    from model import bench
    from model.config import LIGHTNING, SOFTMAX

    rows = list(bench.bench_prefill(TINY, [4, 8, 16], "cpu", torch.float32, bench._timer(True), max_call_ms=0.0))
    assert [r["T"] for r in rows] == [4] and rows[0][LIGHTNING][0] > 0 and rows[0][SOFTMAX][0] > 0


def test_layer_flops_scale_with_sequence_length():
    """Lightning layers cost the same per token at any T; softmax layers add a T^2 term."""
    from model import bench
    from model.config import LIGHTNING, SOFTMAX

    config = get_config("bench")
    assert bench.layer_flops(config, LIGHTNING, 8192) == 2 * bench.layer_flops(config, LIGHTNING, 4096)
    growth = bench.layer_flops(config, SOFTMAX, 8192) - 2 * bench.layer_flops(config, SOFTMAX, 4096)
    H, D = config.num_heads, config.head_dim
    assert growth == 2 * H * D * (8192**2 - 2 * 4096**2)


def test_kv_cache_append_grows_in_place_and_keeps_every_token():
    """Appends write into spare slots; the buffers double when full (O(log n) reallocations
    for n tokens), and the views always hold exactly the tokens appended, in order."""
    from model.cache import KVCache

    B, KV, D = 2, 3, 4
    empty = torch.zeros(B, 0, KV, D)
    cache = KVCache(empty, empty)
    pieces, buffers = [], set()
    for T in [5, 1, 1, 20, 1, 1, 1, 40]:
        k, v = torch.randn(B, T, KV, D), torch.randn(B, T, KV, D)
        cache.append(k, v)
        pieces.append((k, v))
        buffers.add(cache._key_buf.data_ptr())
        assert cache.key.data_ptr() == cache._key_buf.data_ptr()  # a view, not a copy
    assert torch.equal(cache.key, torch.cat([k for k, _ in pieces], dim=1))
    assert torch.equal(cache.value, torch.cat([v for _, v in pieces], dim=1))
    assert len(buffers) <= 4  # 16 -> 32 -> 64 -> 128 slots for 70 tokens


def test_cached_chunk_keeps_new_keys_in_the_graph(device):
    """With autograd on, a chunk that continues from a cache backpropagates into the softmax
    layer's key and value projections through its own tokens (the cache itself is detached)."""
    m = random_model("reference", device)
    ids = random_ids(1, 6, device)
    _, cache = m(ids[:, :3], use_cache=True)
    logits, _ = m(ids[:, 3:], cache=cache, use_cache=True)
    logits.square().sum().backward()
    softmax_layer = next(layer for layer in m.layers if layer.kind == SOFTMAX)
    for proj in (softmax_layer.attn.k_proj, softmax_layer.attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
