"""The one place that reads tuned launch configs.

Files live at ``<root>/<gpu-slug>/<kernel>.json`` where ``<root>`` is ``$KWB_CONFIG_DIR`` or
the ``kernels/configs`` folder shipped with the package. The autotuner writes them through
:func:`config_path` so the tuner and the runtime agree on names. A file looks like::

    {"kernel": "lightning_attn_fwd",
     "meta": {"gpu": ..., "driver": ..., "torch": ..., "triton": "3.6.0", "date": ...,
              "strategy": ..., "candidates_tried": ..., "wall_s": ...},
     "entries": [{"key": {"D": 128, "E": 128, "dtype": "bf16", "T": 16384},
                  "config": {"BT": 64, "BV": 32, "num_warps": 4, "num_stages": 2},
                  "median_ms": ..., "p20_ms": ..., "p80_ms": ..., "runner_up": {...}}]}

Lookup order for ``lookup(kernel, key, default=..., near=("T",))``: the entry whose key equals
``key``; else, among entries that agree on every field outside ``near``, the one nearest in
log2 distance over the ``near`` fields; else ``default``. A missing, corrupt or stale file
(written under another triton major.minor) warns once and yields the default. Nothing here
tunes. Results are cached per (device, kernel, key), so a call costs a dict lookup.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import triton

from profiling.gpu import slugify

PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_root() -> Path:
    """Where configs are read from and written to (``$KWB_CONFIG_DIR`` overrides)."""
    override = os.environ.get("KWB_CONFIG_DIR")
    return Path(override) if override else PACKAGE_CONFIG_DIR


@functools.lru_cache(maxsize=None)
def device_slug(device_index: int | None = None) -> str:
    """Slug of the CUDA device (``"cpu"`` without one): the folder its configs live in."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device() if device_index is None else device_index
    return slugify(torch.cuda.get_device_name(index))


def config_path(kernel: str, slug: str | None = None) -> Path:
    """``<root>/<slug>/<kernel>.json``: shared by the tuner (writes) and :func:`lookup`."""
    return config_root() / (slug or device_slug()) / f"{kernel}.json"


def triton_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _freeze(key: Mapping[str, Any]) -> tuple:
    return tuple(sorted(key.items()))


@dataclass(frozen=True)
class ConfigFile:
    """A config file as found on disk: ``status`` is ok, missing, corrupt or stale."""

    path: Path
    status: str
    data: dict | None = None  # the parsed file when ok or stale
    problem: str = ""  # why it is corrupt or stale

    @property
    def entries(self) -> list[dict]:
        return list(self.data["entries"]) if self.data else []


def read_config_file(path: Path) -> ConfigFile:
    """Parse and classify ``path``: only an ``ok`` file is used at run time."""
    if not path.is_file():
        return ConfigFile(path, "missing")
    try:
        data = json.loads(path.read_text())
        written_with = str(data["meta"]["triton"])
        for entry in data["entries"]:
            if not (isinstance(entry["key"], dict) and isinstance(entry["config"], dict)):
                raise TypeError("an entry's key and config must be objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return ConfigFile(path, "corrupt", problem=f"{type(exc).__name__}: {exc}")
    if triton_minor(written_with) != triton_minor(triton.__version__):
        return ConfigFile(path, "stale", data, f"tuned with triton {written_with}, running {triton.__version__}")
    return ConfigFile(path, "ok", data)


@functools.lru_cache(maxsize=None)
def _load_entries(path: str) -> tuple[tuple[dict, dict], ...]:
    """Valid (key, config) pairs of one file; () with a warning if it is missing/corrupt/stale."""
    found = read_config_file(Path(path))
    if found.status == "missing":
        if found.path.parent.name != "cpu":  # the interpreter: launch configs mean nothing there
            _warn_once(f"kwb: no tuned config file {path}; using defaults (run `kwb tune` on this GPU)")
        return ()
    if found.status == "corrupt":
        _warn_once(f"kwb: ignoring corrupt config file {path} ({found.problem}); using defaults")
        return ()
    if found.status == "stale":
        _warn_once(f"kwb: ignoring stale config file {path}: {found.problem}; using defaults (re-run `kwb tune`)")
        return ()
    return tuple((dict(e["key"]), dict(e["config"])) for e in found.entries)


def _log2_distance(a: Any, b: Any) -> float:
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or a <= 0 or b <= 0:
        return 0.0 if a == b else math.inf
    return abs(math.log2(a) - math.log2(b))


@functools.lru_cache(maxsize=4096)
def _match(path: str, frozen_key: tuple, near: tuple[str, ...]) -> tuple | None:
    """The config of the entry for this key: exact, else nearest in the ``near`` fields (log2
    distance) among entries equal in every other field; None when no entry qualifies."""
    key = dict(frozen_key)
    entries = _load_entries(path)
    for entry_key, config in entries:
        if entry_key == key:
            return _freeze(config)
    fixed = {name: value for name, value in key.items() if name not in near}
    best, best_distance = None, math.inf
    for entry_key, config in entries:
        if {n: v for n, v in entry_key.items() if n not in near} != fixed:
            continue
        distance = sum(_log2_distance(entry_key.get(n), key.get(n)) for n in near)
        if distance < best_distance:
            best, best_distance = config, distance
    return _freeze(best) if best is not None else None


@functools.lru_cache(maxsize=4096)
def _lookup(path: str, frozen_key: tuple, frozen_default: tuple, near: tuple[str, ...]) -> tuple:
    found = _match(path, frozen_key, near)
    if found is not None:
        return found
    if _load_entries(path):
        _warn_once(f"kwb: {path} has no entry compatible with {dict(frozen_key)}; using the default {dict(frozen_default)}")
    return frozen_default


def find_entry(kernel: str, key: Mapping[str, Any], *, near: tuple[str, ...] = (), slug: str | None = None) -> dict | None:
    """The tuned config :func:`lookup` would return for this key, or None where it would fall
    back to the default (no file, a stale or corrupt one, no compatible entry). No warning."""
    path = _path_str(os.environ.get("KWB_CONFIG_DIR"), kernel, slug or device_slug())
    found = _match(path, _freeze(key), tuple(near))
    return dict(found) if found is not None else None


def lookup(
    kernel: str,
    key: Mapping[str, Any],
    *,
    default: Mapping[str, Any],
    near: tuple[str, ...] = (),
    slug: str | None = None,
) -> dict:
    """Launch config of ``kernel`` for the shape bucket ``key`` on this GPU (see module doc)."""
    path = _path_str(os.environ.get("KWB_CONFIG_DIR"), kernel, slug or device_slug())
    return dict(_lookup(path, _freeze(key), _freeze(default), tuple(near)))


def lookup_launchable(
    kernel: str,
    key: Mapping[str, Any],
    *,
    default: Mapping[str, Any],
    valid: Callable[[dict], bool],
    near: tuple[str, ...] = (),
    slug: str | None = None,
) -> dict:
    """:func:`lookup`, but an entry that ``valid`` rejects (written for other head dims, a
    newer space, ...) gives way to ``default`` rather than being launched."""
    found = lookup(kernel, key, default=default, near=near, slug=slug)
    return found if valid(found) else dict(default)


@functools.lru_cache(maxsize=None)
def _path_str(root_override: str | None, kernel: str, slug: str) -> str:
    return str(config_path(kernel, slug))


def clear_cache() -> None:
    """Forget cached files and answers (after a tuner wrote a file, or in tests)."""
    _load_entries.cache_clear()
    _match.cache_clear()
    _lookup.cache_clear()
    _path_str.cache_clear()
    device_slug.cache_clear()
    _warned.clear()
