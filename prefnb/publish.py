"""`prefnb publish PROFILE` and `prefnb verify FOLDER`: a finished study, published in the repository.

What the folder holds, when publish refuses, the README findings section it writes and what
verify compares: README.md, "Publishing a study".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import socket
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefnb.paper import _user_error
from prefnb.project import find_project
from prefnb.rundir import MARKER, atomic_write_text, now_iso

if TYPE_CHECKING:  # pandas and torch (prefnb.manifest) are imported by the commands that use them, so that
    import pandas as pd  # the command line starts light (`prefnb study --list` imports neither)

RESULTS = "results"
MANIFEST = "manifest.json"
RUNS = "runs.csv"
FINDINGS_CSV, FINDINGS_JSON = "findings.csv", "findings.json"
FIGURES, PAPER = "figures", "paper"
README_PROFILE = "laptop"        # the README's findings are this profile's (a real model on a laptop)
BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"
# Columns of the runs table that say where a file was on the machine that ran it, not what ran.
LOCAL_COLUMNS = ("output_dir", "data_dir")
METRIC_PREFIXES = ("eval/", "test/")  # what a rerun elsewhere must reproduce (costs vary by machine) ...
TIMING_SUFFIX = "/seconds"            # ... but not the time a split's evaluation took (eval/seconds)


def _code_version() -> str:
    from prefnb import manifest

    return manifest.code_version()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- what may be published
def _run_dirs(outputs: Path) -> list[Path]:
    """Every finished run directory under ``outputs`` (as :func:`prefnb.report.collect_runs` reads them)."""
    from prefnb.report import REPORT_DIR

    return sorted(p.parent for p in outputs.glob(f"*/*/{MARKER}")
                  if p.parent.parent.name != REPORT_DIR and not p.parent.parent.name.startswith("."))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_publishable(study, outputs: Path) -> list[Path]:
    """The run directories to publish: every run of ``study``, finished, made by committed code at
    one code version, and nothing else finished under ``outputs``. Raises a one-line UserError."""
    from prefnb.execute import RECORD, state

    profile = study.profile.stem
    ids = set(study.by_id)
    todo = [(run, status) for run in study.runs if (status := state(study, run)) != "finished"]
    if todo:
        run, status = todo[0]
        strays = sum(d.name not in ids for d in _run_dirs(outputs))
        hint = (f"; the outputs hold {strays} finished runs that are not this study's (another profile, or a study "
                "of another project folder: the ids of runs that start from other runs include the outputs' path "
                "when it is outside the project)") if strays else ""
        raise _user_error(f"the {profile} study is incomplete: {len(todo)} of {len(study.runs)} runs not finished "
                          f"under {outputs} (first: {run.experiment}/{run.run_id}, {status}); run `prefnb study "
                          f"--profile {profile}` first{hint}")
    # A run of this study made under another profile's name has the same resolved params (its id
    # says so), hence the same numbers: only runs outside the study are refused.
    for run_dir in (d for d in _run_dirs(outputs) if d.name not in ids):
        made_by = _read_json(run_dir / RECORD).get("profile")
        by = f"profile {Path(made_by).stem}" if made_by else "no study (e.g. `prefnb train`)"
        raise _user_error(f"{run_dir} (made by {by}) is not a run of the {profile} study, and the report reads "
                          f"every finished run: publish from outputs that hold only this profile's runs "
                          f"(`prefnb study --profile {profile} --outputs DIR`, then `prefnb publish {profile} "
                          f"--outputs DIR`)")
    run_dirs = [study.run_dir(run) for run in study.runs]
    made_with = {d: str(_read_json(d / "manifest.json").get("code_version") or "not recorded") for d in run_dirs}
    dirty = [d for d, version in made_with.items() if version.endswith("-dirty")]
    if dirty:
        raise _user_error(f"{dirty[0]} was made by uncommitted code ({made_with[dirty[0]]}): rerun it at a commit")
    versions = Counter(made_with.values())
    if len(versions) > 1:
        listed = ", ".join(f"{v} ({n} runs)" for v, n in versions.most_common())
        raise _user_error(f"the {profile} runs were made at {len(versions)} code versions ({listed}): a publication "
                          "names one commit; rerun the study at one commit")
    here = _code_version()
    if here.endswith("-dirty"):
        raise _user_error(f"the working tree is dirty ({here}): commit first, so that the published folder is made "
                          "by committed code")
    return run_dirs


# --- the folder's files
def published_runs(df: pd.DataFrame) -> str:
    """The runs table as published: the report's table without the machine-local path columns."""
    from prefnb.report import runs_csv

    return runs_csv(df.drop(columns=[c for c in LOCAL_COLUMNS if c in df]))


def findings_files(files: dict[str, str]) -> dict[str, str]:
    """findings.csv and findings.json from the report's text artifacts (``build_text_artifacts``)."""
    from prefnb.metrics import TASK_METRIC

    table = files["tables/findings.csv"]
    findings = {"rows": _table(table).to_dict("records"), "metric": TASK_METRIC,
                "numbers": json.loads(files["numbers.json"]).get("findings", {})}
    return {FINDINGS_CSV: table, FINDINGS_JSON: _json_text(findings)}


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def machine() -> dict[str, Any]:
    """The machine publish runs on: CPU model, cores, RAM, GPU."""
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        names = []
    cpu = names[0].strip() if names else platform.processor() or platform.machine()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "gpus": gpus, "system": platform.platform()}


def _one_or_all(values: list) -> Any:
    distinct = sorted({json.dumps(v, sort_keys=True) for v in values})
    return json.loads(distinct[0]) if len(distinct) == 1 else [json.loads(v) for v in distinct]


def commit_of(code_version: str) -> str | None:
    """The full commit hash named by a code version (``0.1.0+<git describe>``), where git knows it."""
    import subprocess

    described = code_version.split("+", 1)[-1].removesuffix("-dirty") if "+" in code_version else ""
    name = described.rsplit("-g", 1)[-1]  # 0.1.0+v1.2-3-gabc1234 names abc1234
    if not name:
        return None
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    return out.stdout.strip() or None


def study_manifest(study, run_dirs: list[Path], df: pd.DataFrame) -> dict[str, Any]:
    """What the published numbers depend on and how long they took (files' sha256 added later)."""
    from prefnb.execute import RECORD

    records = [_read_json(d / RECORD) for d in run_dirs]
    runs = [_read_json(d / "manifest.json") for d in run_dirs]
    code_version = runs[0].get("code_version", "not recorded") if runs else "not recorded"
    started = [r["started_at"] for r in records if r.get("started_at")]
    finished = [r["finished_at"] for r in records if r.get("finished_at")]
    span = ((datetime.fromisoformat(max(finished)) - datetime.fromisoformat(min(started))).total_seconds()
            if started and finished else None)
    published_with = _code_version()
    return {
        "profile": study.profile.stem,
        "code_version": code_version, "commit": commit_of(code_version), "dirty": code_version.endswith("-dirty"),
        "published_with": {"code_version": published_with, "commit": commit_of(published_with),
                           "dirty": published_with.endswith("-dirty"), "at": now_iso()},
        "machine": {**machine(), "ran_the_runs": {r.get("host") for r in records} == {socket.gethostname()}},
        "devices": sorted({str(r.get("device")) for r in runs}),
        "packages": {name: _one_or_all([r.get("packages", {}).get(name) for r in runs])
                     for name in sorted({k for r in runs for k in r.get("packages", {})})},
        "python": _one_or_all([r.get("python") for r in runs]),
        "models": sorted(df["model"].dropna().astype(str).unique()) if "model" in df else [],
        "seeds": sorted(int(s) for s in df["seed"].dropna().unique()) if "seed" in df else [],
        "study": {
            "runs": len(run_dirs), "done": sum(bool(r.get("finished_at")) for r in records),
            "failed": sum(bool(r.get("failed_at")) for r in records),
            "experiments": dict(sorted(Counter(r.experiment for r in study.runs).items())),
            "started_at": min(started) if started else None, "finished_at": max(finished) if finished else None,
            "wall_clock_seconds": span,
            "run_seconds": round(sum(float(r.get("seconds") or 0) for r in records), 1),
        },
    }


# --- publish
def publish(profile: str, *, project: Path | None = None, outputs: Path | None = None) -> Path:
    """Write ``<project>/results/<profile>/`` from the study's outputs and rewrite the README's
    findings section. Returns the folder. Raises a one-line UserError (nothing written) when the
    outputs may not be published."""
    from prefnb.grid import expand
    from prefnb.paper import build_paper, require_runs
    from prefnb.preflight import check_writable
    from prefnb.report import build_text_artifacts, collect_runs

    project = Path(project) if project else find_project()
    outputs = Path(outputs) if outputs else project / "outputs"
    readme = project / "README.md"
    require_runs(outputs)
    study = expand(project, profile, outputs=outputs)
    run_dirs = check_publishable(study, outputs)
    name = study.profile.stem
    results = project / RESULTS
    check_writable(results / name, "results/")
    if readme.is_file():
        _split_readme(readme.read_text(), readme)  # a README without the markers fails before any work
    rendered = build_paper(outputs, project / "paper", engine="pandoc")  # the report, and its preview
    df = collect_runs(outputs, save=False)
    files = {RUNS: published_runs(df), **findings_files(build_text_artifacts(df))}
    meta = study_manifest(study, run_dirs, df)

    tmp = results / f".{name}.publishing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / FIGURES).mkdir(parents=True)
        for rel, text in files.items():
            (tmp / rel).write_text(text)
        for png in sorted((outputs / "report" / "figures").glob("*.png")):
            shutil.copy2(png, tmp / FIGURES / png.name)
        (tmp / PAPER).mkdir()
        for path in rendered:
            shutil.copy2(path, tmp / PAPER / path.name)
        meta["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(_json_text(meta))
        _replace_dir(tmp, results / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if readme.is_file():
        write_readme(readme, results)
    return results / name


def _replace_dir(new: Path, dest: Path) -> None:
    """Put ``new`` at ``dest`` by renames: ``dest`` is the old folder or the new one, never a mix."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- the README's findings section
def _split_readme(text: str, path: Path) -> tuple[str, str, str]:
    """(before, section, after) around the markers; a one-line error where they are not one pair."""
    begin = [m.start() for m in re.finditer(f"^{re.escape(BEGIN)}$", text, re.M)]
    end = [m.start() for m in re.finditer(f"^{re.escape(END)}$", text, re.M)]
    if len(begin) != 1 or len(end) != 1 or begin[0] > end[0]:
        raise _user_error(f"{path}: expected one '{BEGIN}' line followed by one '{END}' line around the findings "
                          "section")
    return text[:begin[0]], text[begin[0] + len(BEGIN):end[0]], text[end[0] + len(END):]


REPRODUCE = f"prefnb study --profile {README_PROFILE} && prefnb publish {README_PROFILE}"


def readme_section(results: Path) -> str:
    """The README's findings section, generated from ``results/laptop/`` (or from its absence)."""
    from prefnb.experiments import EXPERIMENTS, FULL_GRIDS
    from prefnb.metrics import TASK_METRIC
    from prefnb.tables import markdown_table

    folder = results / README_PROFILE
    lines = ["## Findings", ""]
    if not (folder / MANIFEST).is_file():
        return "\n".join(lines + [
            f"No real-model study has been published yet: `{RESULTS}/{README_PROFILE}/` does not exist, so there are "
            f"no findings to report here. To produce and publish them on a laptop's CPU (the `{README_PROFILE}` "
            "profile: a real pretrained model, installed by the setup below):", "",
            "```bash", REPRODUCE, "```", "",
            f"The full grids run on a GPU with {FULL_GRIDS}. `prefnb publish` writes this section from the published "
            "folder; nothing in it is typed by hand.", ""])
    meta = json.loads((folder / MANIFEST).read_text())
    rows = _table((folder / FINDINGS_CSV).read_text())
    tasks = sorted(set(rows["task"])) if "task" in rows else []
    metric = "; ".join(f"{t}: `{TASK_METRIC[t]}`" for t in tasks if t in TASK_METRIC) or "none"
    study = meta["study"]
    left = [e for e in EXPERIMENTS if e not in study["experiments"]]
    wall = study.get("wall_clock_seconds")
    lines += [
        f"From `{RESULTS}/{README_PROFILE}/` (the `{meta['profile']}` profile): model(s) "
        + ", ".join(f"`{m}`" for m in meta["models"]) + f", seeds {', '.join(map(str, meta['seeds']))}, "
        f"{study['done']} runs at code version `{meta['code_version']}` on {meta['machine']['cpu']} "
        f"({meta['machine']['cores']} cores)"
        + (f", {wall / 60:.0f} min wall-clock" if wall is not None else "") + ". "
        f"Each row is a paired difference on the report split ({metric}) with its 95% t-interval over seeds "
        "(the paper's findings table, `@tbl-findings`; the paper itself is `"
        f"{RESULTS}/{README_PROFILE}/{PAPER}/index.html`).", ""]
    if len(rows):
        lines += markdown_table(rows).splitlines()
    else:
        lines += ["The published findings table has no rows: no comparison could be made from these runs."]
    lines += ["", "Reproduce them on a laptop (`prefnb verify " + f"{RESULTS}/{README_PROFILE}` then checks the "
              "new outputs against this folder):", "", "```bash", REPRODUCE, "```", ""]
    if left:
        lines += [f"The {README_PROFILE} profile does not run " + ", ".join(f"`{e}`" for e in left)
                  + f": those questions are left to the full grids on a GPU, {FULL_GRIDS}.", ""]
    else:
        lines += [f"The full grids run on a GPU with {FULL_GRIDS}.", ""]
    return "\n".join(lines)


def write_readme(readme: Path, results: Path) -> None:
    before, _, after = _split_readme(readme.read_text(), readme)
    atomic_write_text(readme, f"{before}{BEGIN}\n{readme_section(results)}{END}{after}")


def readme_problem(readme: Path, results: Path) -> str | None:
    """Why the README's findings section is not what :func:`readme_section` generates (None: it is)."""
    _, section, _ = _split_readme(readme.read_text(), readme)
    if section != f"\n{readme_section(results)}":
        return (f"{readme}: the findings section differs from what `{results}/{README_PROFILE}/` generates; run "
                f"`prefnb publish {README_PROFILE}` (or restore the published folder)")
    return None


# --- verify
def _table(text: str) -> pd.DataFrame:
    """A CSV's cells as the text they are (so that comparisons are to the digit)."""
    import pandas as pd

    return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False) if text.strip() else pd.DataFrame()


def _first_difference(published: pd.DataFrame, fresh: pd.DataFrame, what: str, *, columns=None) -> str | None:
    """The first cell (by run id, then column) where two runs tables differ."""
    cols = columns if columns is not None else sorted(set(published.columns) | set(fresh.columns))
    pub, new = published.set_index("run_id"), fresh.set_index("run_id")
    for rid in pub.index:
        for col in cols:  # a column that no run of a table has is an empty cell of each of its runs
            a = pub.at[rid, col] if col in pub else ""
            b = new.at[rid, col] if col in new else ""
            if a != b:
                return f"{what}: run {rid}, {col}: published {a!r}, outputs {b!r}"
    return None


def verify_published(folder: Path, *, outputs: Path | None = None, subset: bool = False,
                     readme: Path | None = None) -> tuple[str | None, list[str]]:
    """(the first mismatch, or None; notes on what was checked) for a published folder."""
    from prefnb.report import build_text_artifacts, collect_runs

    notes: list[str] = []
    meta = _read_json(folder / MANIFEST)
    if not meta.get("files"):
        return f"{folder / MANIFEST}: missing or not a publication's manifest", notes
    published = _table((folder / RUNS).read_text() if (folder / RUNS).is_file() else "")
    ids = set(published.get("run_id", []))

    outputs = Path(outputs) if outputs else find_project(folder).joinpath("outputs")
    if outputs.is_dir() and any(d.name in ids for d in _run_dirs(outputs)):
        df = collect_runs(outputs, save=False)
        fresh = _table(published_runs(df))
        extra = sorted(set(fresh["run_id"]) - ids)
        missing = sorted(ids - set(fresh["run_id"]))
        if missing and not subset:
            return (f"{outputs} holds {len(ids) - len(missing)} of the {len(ids)} published runs (first missing: "
                    f"{missing[0]}); pass --subset to compare those only"), notes
        if extra:
            return f"{outputs} holds run {extra[0]}, which {folder / RUNS} does not", notes
        metrics = [c for c in published.columns if c.startswith(METRIC_PREFIXES) and not c.endswith(TIMING_SUFFIX)]
        shared = published[published["run_id"].isin(set(fresh["run_id"]))]  # without --subset: every run
        mismatch = _first_difference(shared, fresh, str(folder / RUNS), columns=metrics if subset else None)
        if mismatch:
            return mismatch, notes
        if subset:
            notes.append(f"{len(fresh)} of {len(ids)} published runs are in {outputs}: their {len(metrics)} eval/ "
                         "and test/ metrics match to the digit")
        else:
            versions = sorted(set(fresh.get("code_version", [])))
            if versions != [meta.get("code_version")]:
                return (f"{folder / MANIFEST}: code version {meta.get('code_version')}, the outputs' runs "
                        f"{', '.join(versions)}"), notes
            for rel, text in findings_files(build_text_artifacts(df)).items():
                if not (folder / rel).is_file() or (folder / rel).read_text() != text:
                    return f"{folder / rel}: differs from the findings rebuilt from {outputs}", notes
            notes.append(f"all {len(ids)} runs of {outputs} match {RUNS} cell by cell, the findings match a rebuild, "
                         f"code version {meta.get('code_version')}")
    else:
        notes.append(f"none of the published runs is in {outputs}: checked the folder against its manifest only")

    for rel, digest in sorted(meta["files"].items()):
        path = folder / rel
        if not path.is_file():
            return f"{path}: listed in {MANIFEST} but missing", notes
        if sha256(path) != digest:
            return f"{path}: sha256 differs from {MANIFEST}'s", notes
    unlisted = sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
                      - {MANIFEST, *meta["files"]})
    if unlisted:
        return f"{folder / unlisted[0]}: not listed in {MANIFEST}", notes
    notes.append(f"{len(meta['files'])} files match the manifest's sha256")
    if meta.get("profile") == README_PROFILE and folder.resolve() == (folder.parent / README_PROFILE).resolve():
        readme = readme or find_project(folder) / "README.md"
        if readme.is_file():
            problem = readme_problem(readme, folder.parent)
            if problem:
                return problem, notes
            notes.append(f"{readme}: the findings section is the one this folder generates")
    return None, notes


# --- command line
def cmd_publish(args) -> int:
    folder = publish(args.profile, outputs=Path(args.outputs) if args.outputs else None)
    meta = json.loads((folder / MANIFEST).read_text())
    print(f"published: {folder} ({len(meta['files'])} files, {meta['study']['done']} runs, code version "
          f"{meta['code_version']})")
    print("commit it with the README's findings section: git add results README.md && git commit")
    return 0


def cmd_verify(args) -> int:
    """`prefnb verify FOLDER`: a published folder; `prefnb verify`: the paper (:mod:`prefnb.paper`)."""
    from prefnb.paper import cmd_verify as verify_paper

    if args.published is None:
        if args.subset:
            raise _user_error("--subset compares a published folder: prefnb verify results/PROFILE --subset")
        return verify_paper(args)
    if args.html is not None or args.pdf is not None:
        raise _user_error("--html and --pdf check the paper, not a published folder: run them without FOLDER")
    folder = Path(args.published)
    if not folder.is_dir():
        raise _user_error(f"{folder}: no such published folder (`prefnb publish PROFILE` writes results/PROFILE)")
    problem, notes = verify_published(folder, outputs=Path(args.outputs) if args.outputs else None,
                                      subset=args.subset)
    if problem:
        print(f"prefnb verify: FAILED: {problem}", file=sys.stderr)
        return 1
    print(f"prefnb verify: OK — {folder}")
    for note in notes:
        print(f"  {note}")
    return 0
