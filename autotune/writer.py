"""Writing tuned configs: ``<root>/<gpu-slug>/<kernel>.json``, named by ``kernels._config``.

A write merges into what the file already holds: under an exclusive ``flock`` on a sidecar
``<kernel>.json.lock``, it reads the file, merges entries by bucket key (for a bucket in
both, the entry tuned later wins), writes a temp file in the same folder and renames it over
the old one. Readers see the old file or the new one, never half of one, and two tuners
writing different buckets both keep theirs. A corrupt file, or one written under another
triton major.minor (stale: the runtime ignores it), is replaced rather than merged; the old
file is kept beside it as ``<kernel>.json.<status>`` (a stale file is still good on the stack
that wrote it, so nothing tuned is lost).

``meta`` describes the run that wrote the file last; every entry carries its own date,
strategy, candidate count and tuning time. After a write the runtime's lookup cache is
cleared so this process sees the new file.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from autotune.result import config_key
from kernels._config import ConfigFile, clear_cache, config_path, config_root, read_config_file


def target_path(kernel: str, slug: str | None = None, root: Path | None = None) -> Path:
    """Where ``kernel``'s configs go: :func:`config_path`, re-rooted under ``root`` if given."""
    path = config_path(kernel, slug)
    return path if root is None else Path(root) / path.relative_to(config_root())


def known_winners(kernel: str, slug: str | None = None, root: Path | None = None) -> list[dict]:
    """The distinct configs that won some bucket of ``kernel``'s file (ok or stale: a winner
    tuned under another triton is still a good place to start a search), in file order;
    [] when the file is missing or corrupt. The tuner seeds its local search with them."""
    found = read_config_file(target_path(kernel, slug, root))
    winners: dict[tuple, dict] = {}
    for entry in found.entries:
        winners.setdefault(config_key(entry["config"]), dict(entry["config"]))
    return list(winners.values())


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """Union by bucket key; where both have a bucket, the later ``date`` wins (ties: ``new``)."""
    merged = {config_key(e["key"]): e for e in old}
    for entry in new:
        key = config_key(entry["key"])
        if key not in merged or str(merged[key].get("date", "")) <= str(entry.get("date", "")):
            merged[key] = entry
    return [merged[key] for key in sorted(merged)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file beside ``path``, fsync it, rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Written:
    path: Path
    entries: int  # entries in the file after the merge
    replaced: ConfigFile  # the file found before the write (missing, ok, corrupt or stale)
    kept: Path | None = None  # where a replaced corrupt or stale file was moved


def write_configs(
    kernel: str, entries: list[dict], meta: dict, *, slug: str | None = None, root: Path | None = None
) -> Written:
    """Merge ``entries`` into ``kernel``'s config file for ``slug`` (this GPU by default)."""
    path = target_path(kernel, slug, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        before = read_config_file(path)
        merged = merge_entries(before.entries if before.status == "ok" else [], entries)
        kept = None
        if before.status in ("corrupt", "stale"):
            kept = path.with_name(f"{path.name}.{before.status}")
            os.replace(path, kept)
        _write_atomic(path, {"kernel": kernel, "meta": meta, "entries": merged})
    clear_cache()
    return Written(path, len(merged), before, kept)
