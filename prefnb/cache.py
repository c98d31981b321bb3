"""A content-addressed disk cache for work that many runs share (contract 6 of DESIGN.md):
keyed on what the work depends on, not on the run, so a β sweep or the variants compute it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from prefnb.rundir import atomic_write

log = logging.getLogger(__name__)


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_version(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, modification time in ns, size): what keeps an in-process memo of a
    file's contents valid while the file is unchanged."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def cached(cache_dir: Path, kind: str, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """Load ``<cache_dir>/<kind>/<key>.pt`` or compute and store it atomically. Returns (value, hit)."""
    import torch  # here, so that the light modules can use file_version without importing torch

    path = Path(cache_dir) / kind / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False), True
        except Exception as err:  # a torn or foreign file: recompute rather than fail the run
            log.warning("ignoring unreadable cache file %s (%s)", path, err)
    value = compute()
    atomic_write(path, lambda tmp: torch.save(value, tmp))
    return value, False
