"""kernels/_config.py: lookup order, fallbacks, caching and its cost, and the kernel launching
with what the lookup returns."""
from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
import triton

from kernels import _config
from kernels.lightning_attn import forward, lightning_attn, minimax_slopes
from reference.lightning_attn import lightning_attn_ref
from tests.helpers import TOLERANCE, assert_close

KERNEL = "demo_kernel"
SLUG = "test-gpu"
DEFAULT = {"BT": 64, "num_warps": 4}


def key(T: int, D: int = 128, dtype: str = "bfloat16") -> dict:
    return {"D": D, "E": D, "dtype": dtype, "T": T}


def write_file(entries: list[tuple[dict, dict]], *, kernel: str = KERNEL, slug: str = SLUG, triton_version: str | None = None):
    path = _config.config_path(kernel, slug)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "kernel": kernel,
        "meta": {"triton": triton_version or triton.__version__},
        "entries": [{"key": k, "config": c} for k, c in entries],
    }
    path.write_text(json.dumps(data))
    return path


def lookup(k: dict, slug: str = SLUG) -> dict:
    return _config.lookup(KERNEL, k, default=DEFAULT, near=("T",), slug=slug)


@pytest.fixture(autouse=True)
def _every_test_in_its_own_config_dir(config_dir):
    """(``config_dir``: tests/conftest.py)"""


def test_exact_bucket_first():
    write_file([(key(1024), {"BT": 32}), (key(4096), {"BT": 128}), (key(2048), {"BT": 16})])
    assert lookup(key(4096)) == {"BT": 128}
    assert lookup(key(2048)) == {"BT": 16}


def test_nearest_T_among_entries_of_the_same_head_dims_and_dtype():
    write_file([
        (key(1024), {"BT": 32}),
        (key(16384), {"BT": 128}),
        (key(2048, D=64), {"BT": 16}),  # closer in T, but another head dim: never used for D=128
        (key(2048, dtype="float16"), {"BT": 16}),  # and another dtype
    ])
    assert lookup(key(2048)) == {"BT": 32}  # log2 distance 1 vs 3
    assert lookup(key(8192)) == {"BT": 128}  # 3 vs 1
    assert lookup(key(2**20)) == {"BT": 128}  # far beyond every entry: still the nearest


def test_default_when_no_entry_is_compatible():
    write_file([(key(1024), {"BT": 32})])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup(key(1024, D=64)) == DEFAULT
        assert lookup(key(2048, D=64)) == DEFAULT
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("no entry compatible" in m for m in messages)


def test_find_entry_is_lookup_without_the_default():
    """find_entry returns what lookup would from the file, None where lookup would fall back
    (no compatible entry, a stale file, no file), and warns about the fallback no more than
    lookup's own file checks do (kwb info --model uses it to say tuned / default)."""
    write_file([(key(1024), {"BT": 32}), (key(16384), {"BT": 128})])
    find = lambda k, slug=SLUG: _config.find_entry(KERNEL, k, near=("T",), slug=slug)  # noqa: E731
    assert find(key(1024)) == lookup(key(1024)) == {"BT": 32}
    assert find(key(8192)) == lookup(key(8192)) == {"BT": 128}  # nearest T
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find(key(1024, D=64)) is None
    assert not caught
    write_file([(key(1024), {"BT": 32})], slug="old-gpu", triton_version="2.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file checks' own warnings (missing, stale)
        assert find(key(1024), slug="no-such-gpu") is None
        assert find(key(1024), slug="old-gpu") is None


def test_missing_file_warns_once_and_falls_back():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup(key(1024), slug="gpu-without-configs") == DEFAULT
        assert lookup(key(4096), slug="gpu-without-configs") == DEFAULT
    assert len(caught) == 1 and "no tuned config file" in str(caught[0].message)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"entries": []}), json.dumps({"meta": {"triton": "3.0"}, "entries": [{"key": 1}]})],
                         ids=["malformed", "no-meta", "bad-entry"])
def test_corrupt_file_warns_and_falls_back(text):
    path = _config.config_path(KERNEL, SLUG)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup(key(1024)) == DEFAULT
        assert lookup(key(2048)) == DEFAULT
    assert len(caught) == 1 and "corrupt" in str(caught[0].message)


def test_stale_file_from_another_triton_minor_warns_and_falls_back():
    major, minor = map(int, triton.__version__.split(".")[:2])
    write_file([(key(1024), {"BT": 32})], triton_version=f"{major}.{minor + 1}.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup(key(1024)) == DEFAULT
    assert len(caught) == 1 and "stale" in str(caught[0].message)
    _config.clear_cache()
    write_file([(key(1024), {"BT": 32})], triton_version=f"{major}.{minor}.99")  # another patch release is fine
    assert lookup(key(1024)) == {"BT": 32}


def test_config_dir_override(config_dir, monkeypatch):
    assert _config.config_root() == config_dir
    assert _config.config_path("k", "s") == config_dir / "s" / "k.json"
    monkeypatch.delenv("KWB_CONFIG_DIR")
    assert _config.config_root() == _config.PACKAGE_CONFIG_DIR


def test_lookup_is_cached_until_cleared():
    path = write_file([(key(1024), {"BT": 32})])
    assert lookup(key(1024)) == {"BT": 32}
    path.write_text("{now corrupt")  # a cached lookup does not read the file again
    assert lookup(key(1024)) == {"BT": 32}
    _config.clear_cache()
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert lookup(key(1024)) == DEFAULT


def test_cached_lookup_costs_microseconds():
    write_file([(key(2**p), {"BT": 2**p}) for p in range(10, 17)])
    k = key(3000)
    lookup(k)
    calls = 10_000
    start = time.perf_counter()
    for _ in range(calls):
        lookup(k)
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    assert per_call_us < 50, f"cached lookup takes {per_call_us:.1f} us per call"


@pytest.fixture
def launch_spy(monkeypatch):
    """Records the launch config of every ``_lightning_fwd_kernel`` launch, then launches."""
    launches: list[dict] = []
    kernel = forward._lightning_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                launches.append({name: kwargs[name] for name in forward.CONFIG_FIELDS})
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(forward, "_lightning_fwd_kernel", Spy())
    return launches


def test_kernel_launches_with_the_looked_up_config(launch_spy, device):
    tuned = {"BT": 32, "BV": 16, "num_warps": 8, "num_stages": 2}
    assert tuned != forward.default_config(32, 32)
    bad = {"BT": 32, "BV": 64, "num_warps": 4, "num_stages": 2}  # BV > E: cannot launch at E=32
    bucket = forward.bucket_key(32, 32, 64, torch.bfloat16)
    write_file([(bucket, tuned), (forward.bucket_key(16, 16, 64, torch.bfloat16), bad)],
               kernel=forward.KERNEL, slug=_config.device_slug())

    H = 2
    slopes = minimax_slopes(H, 3, 8).to(device)
    for T in (64, 100):  # exact bucket, then the nearest one (T=128 -> 64)
        q, k, v = (torch.randn(1, T, H, 32, device=device, dtype=torch.bfloat16) for _ in range(3))
        o, _ = lightning_attn(q, k, v, slopes)
        assert launch_spy[-1] == tuned
        assert_close("o", o, lightning_attn_ref(q, k, v, slopes)[0], TOLERANCE[torch.bfloat16])

    # an entry the kernel cannot launch is replaced by the default, not launched
    q, k, v = (torch.randn(1, 64, H, 16, device=device, dtype=torch.bfloat16) for _ in range(3))
    o, _ = lightning_attn(q, k, v, slopes)
    assert launch_spy[-1] == forward.default_config(16, 16)
    assert_close("o", o, lightning_attn_ref(q, k, v, slopes)[0], TOLERANCE[torch.bfloat16])


def test_lookup_launchable_replaces_an_entry_the_kernel_cannot_launch():
    write_file([(key(1024), {"BT": 48, "num_warps": 4}), (key(4096), {"BT": 128, "num_warps": 8})])
    valid = lambda c: c["BT"] in (32, 64, 128)  # noqa: E731
    launchable = lambda k: _config.lookup_launchable(KERNEL, k, default=DEFAULT, valid=valid, near=("T",), slug=SLUG)  # noqa: E731
    assert lookup(key(1024)) == {"BT": 48, "num_warps": 4}  # the plain lookup returns what the file says
    assert launchable(key(1024)) == DEFAULT
    assert launchable(key(4096)) == {"BT": 128, "num_warps": 8}
