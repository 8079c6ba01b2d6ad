"""Test-wide setup: the Triton interpreter on machines without a GPU, poisoned outputs.

``TRITON_INTERPRET`` must be set before any kernel module is imported, which is why it is
set here, at conftest import time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

_torch_empty = torch.empty


def nan_empty(*args, **kwargs):
    """``torch.empty`` whose floating-point buffers start as NaN (spawned test ranks install
    it themselves: they do not run the fixture below)."""
    out = _torch_empty(*args, **kwargs)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@pytest.fixture(autouse=True)
def poison_outputs(request, monkeypatch):
    """Every ``torch.empty`` float buffer (kernel outputs included) starts as NaN, so an
    element a kernel forgot to write fails the comparison. Not in benchmarks: the fill is a
    memset inside the timed call (it added ~18% to the forward at T=16K on an H100)."""
    if "benchmarks" not in request.node.path.parts:
        monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """``KWB_CONFIG_DIR`` pointed at a fresh folder; the lookup's caches cleared around the test."""
    from kernels import _config

    monkeypatch.setenv("KWB_CONFIG_DIR", str(tmp_path))
    _config.clear_cache()
    yield tmp_path
    _config.clear_cache()


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if not hasattr(item, "_nodeid"):
            # pytest-benchmark 5.2 reads the private item._nodeid, which pytest 9.1 no longer
            # sets on every item (seen on the GPU machine with -k): give it the public one
            item._nodeid = item.nodeid
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
