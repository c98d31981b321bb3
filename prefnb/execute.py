"""Executing one run of the study, crash-safely: its lock, its state on disk, papermill.

A run directory is finished only when ``COMPLETE`` exists, written last; ``FAILED`` holds
the error of a run whose notebook raised. Locks are ``fcntl.flock`` on
``outputs/.locks/<run_id>.lock``, released by the kernel when the holder dies, so SIGKILL
never leaves a run locked or looking finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

from prefnb.grid import Run, Study, path_for_notebooks
from prefnb.notebook import STUDY_ENV
from prefnb.rundir import (atomic_write_json, atomic_write_text, is_finished, mark_finished, now_iso, read_json,
                           read_metrics)

FAILED = "FAILED"
RECORD = "study.json"      # the runner's record of a run: group, axis labels, dependencies, timing
NOTEBOOK = "notebook.ipynb"
KERNEL_LOG = "kernel.log"  # the kernel process's own stdout/stderr


# --- locks and run-directory state
def lock_path(study: Study, run: Run) -> Path:
    return study.outputs / ".locks" / f"{run.run_id}.lock"


def acquire_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` if nobody else holds it (an fd to release), else None.

    The lock dies with its process (SIGKILL included), so a crashed run never blocks a rerun.
    Lock files are never deleted: deleting one while another process waits on it races.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()} {now_iso()}\n".encode())
    return fd


def release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """``with try_lock(path) as mine:`` — hold the lock for the block if nobody else does."""
    fd = acquire_lock(path)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release_lock(fd)


def locked_elsewhere(path: Path) -> bool:
    """Whether another process holds the lock (without creating anything)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we may have taken
    return False


def state(study: Study, run: Run) -> str:
    """finished | failed | running (locked elsewhere) | unfinished (left by a crash) | pending."""
    run_dir = study.run_dir(run)
    if is_finished(run_dir):
        return "finished"
    if locked_elsewhere(lock_path(study, run)):
        return "running"
    if (run_dir / FAILED).is_file():
        return "failed"
    return "unfinished" if run_dir.exists() else "pending"


def clear_run_dir(run_dir: Path) -> None:
    """Remove an unfinished attempt: rename first (atomic), then delete."""
    if not run_dir.exists():
        return
    trash = run_dir.with_name(f".trash-{run_dir.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def key_metric(run: Run, run_dir: Path) -> str:
    name = run.params.key_metric
    value = (read_metrics(run_dir) or {}).get(name)
    return f"{name}={value:.4g}" if isinstance(value, (int, float)) else ""


def run_seconds(run_dir: Path) -> float | None:
    try:
        return float(read_json(run_dir / RECORD).get("seconds"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# --- executing one run
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _QuietPapermill(logging.Filter):
    """We pass every RunParams key; a notebook's parameters cell names only those it shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


def error_line(err: BaseException) -> str:
    """One line for the summary: the notebook's exception, not papermill's wrapper."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(err).__name__}: {err}"
    text = _ANSI.sub("", text).strip()
    return text.splitlines()[0] if text else type(err).__name__


def error_details(err: BaseException) -> str:
    if getattr(err, "traceback", None):  # papermill's PapermillExecutionError: the cell's traceback
        return _ANSI.sub("", "\n".join(err.traceback))
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def execute_notebook(run: Run, study: Study, run_dir: Path) -> None:
    """Run the notebook with papermill; the executed copy is saved even when a cell fails."""
    import papermill

    logger = logging.getLogger("papermill")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _QuietPapermill) for f in logger.filters):
        logger.addFilter(_QuietPapermill())
    params = run.params.to_dict()
    params["output_dir"] = path_for_notebooks(run_dir, study.project)
    os.environ[STUDY_ENV] = "1"  # inherited by the kernel: prefnb.notebook.interactive() is False
    with open(run_dir / KERNEL_LOG, "ab") as log:
        # The kernel starts in the project root (relative paths in params resolve there). It
        # is set through nbclient rather than papermill's `cwd`, which would chdir this whole
        # process and so race between runs going on in parallel (--jobs).
        papermill.execute_notebook(str(run.notebook), str(run_dir / NOTEBOOK), parameters=params,
                                   kernel_name="python3", progress_bar=False,
                                   resources={"metadata": {"path": str(study.project)}},
                                   kernel_manager_class=_logged_kernel_manager(log))


def _logged_kernel_manager(log):
    """A kernel manager whose kernel writes its own stdout/stderr (native-library messages,
    ipykernel's start-up warnings, a crash) to the run's kernel.log instead of our terminal.
    The kernel also exits by itself when this process dies (ipykernel's parent poller)."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


def _record(run: Run, study: Study, **extra) -> dict:
    return {
        "run_id": run.run_id, "experiment": run.experiment, "group": run.group, "also_groups": run.also_groups,
        "labels": run.labels, "notebook": path_for_notebooks(run.notebook, study.project),
        "depends_on": {k: f"{study.by_id[v].experiment}/{v}" for k, v in run.deps.items()},
        "profile": path_for_notebooks(study.profile, study.project), "host": socket.gethostname(),
        "pid": os.getpid(), **extra,
    }


def execute_run(run: Run, study: Study,
                execute: Callable[[Run, Study, Path], None] = execute_notebook) -> tuple[str, str, float]:
    """Execute one run under its lock (held by the caller). Returns (status, message, seconds)."""
    run_dir = study.run_dir(run)
    clear_run_dir(run_dir)
    run_dir.mkdir(parents=True)
    started, started_at = time.perf_counter(), now_iso()
    atomic_write_json(run_dir / RECORD, _record(run, study, started_at=started_at))
    try:
        execute(run, study, run_dir)
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
            raise RuntimeError(f"the notebook finished without writing {metrics_path.name}")
        if not isinstance(read_json(metrics_path), dict):
            raise RuntimeError(f"{metrics_path.name} is not a JSON object")
        if not (run_dir / NOTEBOOK).is_file():
            raise RuntimeError("the executed notebook was not saved")
    except Exception as err:  # noqa: BLE001 — any failure of a run is recorded, the study goes on
        seconds = time.perf_counter() - started
        line = error_line(err)
        atomic_write_text(run_dir / FAILED, f"{line}\n\n{error_details(err)}\n")
        atomic_write_json(run_dir / RECORD, _record(run, study, started_at=started_at, failed_at=now_iso(),
                                                    seconds=seconds, error=line))
        return "failed", line, seconds
    seconds = time.perf_counter() - started
    atomic_write_json(run_dir / RECORD, _record(run, study, started_at=started_at, finished_at=now_iso(),
                                                seconds=seconds))
    mark_finished(run_dir)  # last: only now does the run count as finished
    return "done", "", seconds
