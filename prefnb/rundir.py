"""The run directory contract (DESIGN.md contract 3): atomic files and the completion marker.

A run is finished exactly when ``<run_dir>/COMPLETE`` exists; it is written last, so a run
killed at any moment — SIGKILL included — never looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

MARKER = "COMPLETE"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """The project's one way to write a file: ``path`` holds either its old content or all of the
    new one. ``write(tmp)`` writes to a temporary file beside ``path`` (same folder, so the rename
    cannot cross file systems; same suffix, so writers that go by it, e.g. savefig, pick the right
    format), which is synced, then renamed over ``path``; on any error ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_metrics(run_dir: str | Path) -> dict | None:
    """A run directory's metrics.json, or None where it is missing or unreadable (a run still
    going, or killed mid-write by an older version)."""
    try:
        metrics = read_json(Path(run_dir) / "metrics.json")
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MARKER).is_file()


def mark_finished(run_dir: str | Path) -> None:
    """Write the completion marker: the last write of a run."""
    atomic_write_json(Path(run_dir) / MARKER, {"finished_at": now_iso()})


def clear_finished(run_dir: str | Path) -> None:
    marker = Path(run_dir) / MARKER
    if marker.is_file():  # (a run_dir under a file is reported by prefnb.preflight, not here)
        marker.unlink()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
