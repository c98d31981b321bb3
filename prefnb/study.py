"""`prefnb study` and `prefnb run`: execute the study's notebooks with papermill, crash-safely.

This module schedules the runs of :mod:`prefnb.grid` in dependency order, each under its lock,
so that processes or machines sharing the outputs folder never run one twice; :mod:`prefnb.execute`
runs one. Finished runs are reused; the runs that need a failed one are skipped, the rest go on.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from prefnb.config import ParamsError
from prefnb.execute import (acquire_lock, error_line, execute_notebook, execute_run, key_metric, lock_path,
                            release_lock, run_seconds, state)
from prefnb.grid import Run, Study, expand, run_summary
from prefnb.preflight import check_writable
from prefnb.project import find_project
from prefnb.rundir import is_finished

POLL_SECONDS = 5.0


class _Inline:
    """An executor that runs each job at once in this thread (jobs = 1: Ctrl-C works as usual)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 — delivered through the future, like a pool's
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class Outcome:
    run: Run
    status: str          # done | reused | failed | skipped (dependency failed) | not run
    message: str = ""
    seconds: float | None = None


def run_all(study: Study, runs: list[Run], *, fail_fast: bool = False, out: TextIO | None = None,
            execute: Callable[[Run, Study, Path], None] = execute_notebook, poll: float = POLL_SECONDS,
            jobs: int = 1) -> list[Outcome]:
    """Run ``runs`` (a dependency-closed list in study order), ``jobs`` at a time; finished
    runs are reused, runs locked by another process are waited for, never run twice.

    With ``--fail-fast`` nothing new starts after a failure (runs already going finish)."""
    say = functools.partial(_print, file=out)
    todo = [r for r in runs if not is_finished(study.run_dir(r))]
    outcomes = {r.run_id: Outcome(r, "reused", seconds=run_seconds(study.run_dir(r))) for r in runs if r not in todo}
    if not todo:
        say(f"all {_n(len(runs), 'run')} already finished: nothing to train")
        return [outcomes[r.run_id] for r in runs]
    say(f"{_n(len(runs), 'run')}: {len(runs) - len(todo)} finished earlier, {len(todo)} to run"
        + (f", {jobs} at a time" if jobs > 1 else "") + f" (outputs: {study.outputs})")

    def failed_deps(run: Run) -> list[str]:
        return [d for d in run.dep_ids if d in outcomes and outcomes[d].status in ("failed", "skipped")]

    pending = list(todo)
    active: dict[Future, tuple[Run, int, str]] = {}   # future -> (run, lock fd, label)
    counter, waiting_said, stop = 0, False, False
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="prefnb-run") if jobs > 1 else _Inline()
    try:
        while (pending and not stop) or active:
            # start every run that is ready, while there is a free slot
            for run in list(pending):
                if stop or len(active) >= jobs:
                    break
                bad = failed_deps(run)
                if bad:
                    pending.remove(run)
                    outcomes[run.run_id] = Outcome(run, "skipped", f"dependency failed: {bad[0]}")
                    continue
                if not all(is_finished(study.run_dir(study.by_id[d])) for d in run.dep_ids):
                    continue  # a dependency is still to run (here or elsewhere)
                fd = acquire_lock(lock_path(study, run))
                if fd is None:
                    continue  # running elsewhere; come back to it
                pending.remove(run)
                if is_finished(study.run_dir(run)):  # finished elsewhere meanwhile
                    release_lock(fd)
                    outcomes[run.run_id] = Outcome(run, "reused", "finished elsewhere", run_seconds(study.run_dir(run)))
                    continue
                counter += 1
                label = f"[{counter}/{len(todo)}] {run.experiment} {run.run_id} ({run_summary(run)})"
                if jobs > 1:
                    say(f"{label} started")
                else:
                    say(f"{label} running …", end=" ")
                active[pool.submit(execute_run, run, study, execute)] = (run, fd, label)
                waiting_said = False
            if not active:
                if pending and not stop:
                    if not waiting_said:
                        say(f"waiting for {_n(len(pending), 'run')} whose run or dependencies are running "
                            "elsewhere …")
                        waiting_said = True
                    time.sleep(poll)
                continue
            done, _ = wait(list(active), timeout=poll, return_when=FIRST_COMPLETED)
            for future in done:
                run, fd, label = active.pop(future)
                try:
                    status, message, seconds = future.result()
                finally:
                    release_lock(fd)
                outcomes[run.run_id] = Outcome(run, status, message, seconds)
                text = f"{status} {seconds:.1f} s" + (f": {message}" if message else "")
                say(f"{label} {text}" if jobs > 1 else text)
                if status == "failed" and fail_fast:
                    stop = True
    except KeyboardInterrupt:
        if jobs == 1:
            raise
        # Worker threads cannot be interrupted inside papermill; leave now. Their kernels exit
        # with this process (parent poller), their locks are released by the OS, and their run
        # directories, unfinished, are redone by the next `prefnb study`.
        say("\ninterrupted: unfinished runs will be redone by the next `prefnb study`")
        os._exit(130)
    finally:
        pool.shutdown(wait=True)
    for run in pending:  # only after --fail-fast
        bad = failed_deps(run)
        outcomes[run.run_id] = (Outcome(run, "skipped", f"dependency failed: {bad[0]}") if bad
                                else Outcome(run, "not run", "stopped by --fail-fast"))
    return [outcomes[r.run_id] for r in runs]


def _n(count: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{count} {noun if count == 1 else plural}"


def summary_table(study: Study, outcomes: list[Outcome]) -> str:
    rows = [("run", "status", "key metric", "time")]
    for o in outcomes:
        status = f"FAILED: {o.message}" if o.status == "failed" else o.status + (f" ({o.message})" if o.message else "")
        if len(status) > 72:
            status = status[:71] + "…"
        seconds = f"{o.seconds:.1f} s" if o.seconds is not None else ""
        rows.append((o.run.key, status, key_metric(o.run, study.run_dir(o.run)), seconds))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(", ".join(f"{n} {s}" for s, n in Counter(o.status for o in outcomes).items()))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines.append("\nfailed runs (the executed notebook and FAILED, with the traceback, are in the run directory):")
        lines += [f"  {study.run_dir(o.run)}\n    {o.message}" for o in failed]
    return "\n".join(lines)


def list_runs(study: Study, runs: list[Run]) -> None:
    """One tab-separated line per run (id, experiment, status, key params), for schedulers;
    the header goes to stderr, so that `--list | cut -f1` and `--list | wc -l` count runs."""
    _print("# run_id\texperiment\tstatus\tparams", file=sys.stderr)
    for run in runs:
        _print(f"{run.run_id}\t{run.experiment}\t{state(study, run)}\t{run_summary(run)}")


def _print(*args, file: TextIO | None = None, **kw) -> None:
    """print, flushed; a closed pipe (`prefnb study | head`) silences output, not the study."""
    file = file or sys.stdout
    try:
        print(*args, file=file, flush=True, **kw)
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), file.fileno())
        except (OSError, ValueError):
            pass


# --- command line
def _select(study: Study, args) -> list[Run]:
    if getattr(args, "run_id", None):
        return study.closure([study.find(args.run_id)])
    if args.only:
        known = sorted({r.experiment for r in study.runs})
        wanted = set()
        for name in args.only:
            hits = [e for e in known if e == name or e.startswith(name)]
            if not hits:
                raise ParamsError(f"--only {name}: no such experiment (experiments: {', '.join(known)})")
            wanted.update(hits)
        return study.closure([r for r in study.runs if r.experiment in wanted])
    return study.runs


def cmd_study(args) -> int:
    study = expand(Path(args.project) if args.project else find_project(), args.profile, outputs=args.outputs,
                   params_dir=args.params_dir, notebooks_dir=args.notebooks_dir)
    runs = _select(study, args)
    if args.list:
        list_runs(study, runs)
        return 0
    missing = sorted({str(r.notebook) for r in runs if not r.notebook.is_file()})
    if missing:
        raise ParamsError(f"notebook not found: {missing[0]}")
    check_writable(study.outputs, "--outputs")
    jobs = args.jobs or study.jobs
    if jobs > 1:  # share the cores between the kernels instead of oversubscribing them
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // jobs)))
    started = time.perf_counter()
    outcomes = run_all(study, runs, fail_fast=args.fail_fast, jobs=jobs, execute=execute_notebook)
    _print()
    _print(summary_table(study, outcomes))
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    _print(f"wall-clock: {minutes} min {seconds:02d} s for {len(runs)} runs, {jobs} at a time")
    failed = any(o.status in ("failed", "skipped", "not run") for o in outcomes)
    if not getattr(args, "run_id", None):
        _note_strays(study, runs)
        if not args.no_report:
            failed |= not _build_report(study)
    return 1 if failed else 0


def _note_strays(study: Study, runs: list[Run]) -> None:
    """Say so when outputs/ holds run directories this study does not have (older params?)."""
    ids = {r.run_id for r in study.runs}
    strays = [d for exp in sorted({r.experiment for r in runs}) if (study.outputs / exp).is_dir()
              for d in (study.outputs / exp).iterdir() if d.is_dir() and not d.name.startswith(".")
              and d.name not in ids]
    if strays:
        _print(f"note: {_n(len(strays), 'run directory')} under {study.outputs} not in this study (other profile or "
              f"older parameters), e.g. {strays[0]}; the report reads every finished run")


def _build_report(study: Study) -> bool:
    """Tables and figures from the outputs; False if that fails."""
    from prefnb.report import build_report

    try:
        result = build_report(study.outputs)
    except Exception as err:  # noqa: BLE001
        print(f"report: failed: {error_line(err)}", file=sys.stderr)
        return False
    if result:
        _print(f"report: {len(result)} files under {Path(os.path.commonpath([str(p) for p in result]))}")
    return True


__all__ = ["run_all", "summary_table", "list_runs", "cmd_study"]
