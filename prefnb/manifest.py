"""manifest.json: what a run's numbers depend on (contract 3): data hashes, code and package
versions, seed, device, start and end time."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from prefnb import __version__
from prefnb.rundir import atomic_write_json, now_iso

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu", "trl", "papermill")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None where it is not installed)."""
    versions = dict.fromkeys(names)
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def code_version() -> str:
    """`git describe` of the checkout the package runs from (marked -dirty), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return __version__
    return f"{__version__}+{out.stdout.strip()}" if out.returncode == 0 else __version__


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def write_manifest(path: Path, *, params, task, device, started_at: str) -> None:
    atomic_write_json(path, {
        "run_id": params.run_id(),
        "seed": params.seed,
        "data_seed": params.data_seed,
        "data": {"files_sha256": task.source_files, "datasets_sha256": task.hashes()},
        "code_version": code_version(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device_description(device),
        "started_at": started_at,
        "finished_at": now_iso(),
    })
