"""Study grids: a profile plus the experiment files in ``params/`` → an ordered list of runs.

Pure: reads YAML, loads no model, touches no outputs. ``prefnb study --list`` is this module.
The files' format, and the order in which a run's keys are layered, are documented in
:mod:`prefnb.grid_files`, which reads them into run groups; this module expands the groups
into runs with stable ids and binds their dependencies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from prefnb.config import FIELDS, ParamsError, RunParams, coerce_value, read_profile, resolve_params
from prefnb.grid_files import (STUDY_KEYS, Context, Group, Layer, apply_scales, check_keys, display_path,
                               experiment_files, find_profile, fixed_epochs, load_groups, order_groups, scale_field,
                               target_key, train_size_design)

@dataclass
class Run:
    """One run of the study: resolved params, where it lives, what it needs first."""

    experiment: str
    group: str                              # "<experiment>/<group>" that produced it (the first, if several)
    params: RunParams
    notebook: Path
    labels: dict[str, Any]                  # axis name -> label (the run's coordinates in its grid)
    deps: dict[str, str] = field(default_factory=dict)   # bound key -> run id it depends on
    also_groups: list[str] = field(default_factory=list)  # other groups that produced the same run

    @property
    def run_id(self) -> str:
        return self.params.run_id()

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}"

    @property
    def dep_ids(self) -> list[str]:
        return list(dict.fromkeys(self.deps.values()))


@dataclass
class Study:
    """The expanded study: runs in dependency order, and where things are."""

    runs: list[Run]
    project: Path
    outputs: Path
    profile: Path
    jobs: int = 1                           # runs at a time (the profile's study.jobs)

    def __post_init__(self) -> None:
        self.by_id = {r.run_id: r for r in self.runs}

    def run_dir(self, run: Run) -> Path:
        return self.outputs / run.experiment / run.run_id

    def closure(self, runs: Iterable[Run]) -> list[Run]:
        """These runs and everything they depend on, in study order."""
        wanted: set[str] = set()
        stack = [r.run_id for r in runs]
        while stack:
            rid = stack.pop()
            if rid not in wanted:
                wanted.add(rid)
                stack.extend(self.by_id[rid].dep_ids)
        return [r for r in self.runs if r.run_id in wanted]

    def find(self, text: str) -> Run:
        """A run by id, `experiment/id`, or an unambiguous id prefix."""
        rid = text.strip().rstrip("/").split("/")[-1]
        if rid in self.by_id:
            return self.by_id[rid]
        hits = [r for r in self.runs if r.run_id.startswith(rid)]
        if len(hits) == 1:
            return hits[0]
        what = "matches several runs" if hits else "is not a run of this study"
        raise ParamsError(f"run '{text}' {what} (profile {self.profile}); see `prefnb study --list`")


# ---------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------
def _axes(group: Group) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """[(axis, [(label, value or mapping)])] for a group's grid."""
    out = []
    for axis, values in (group.spec.get("grid") or {}).items():
        src = f"{group.source}.grid.{axis}"
        if isinstance(values, dict):  # a named axis: label -> mapping of keys
            if axis in FIELDS or scale_field(axis):
                raise ParamsError(f"{src}: axis '{axis}' is a RunParams key: give a list of values, not a mapping")
            out.append((axis, [(label, mapping or {}) for label, mapping in values.items()]))
        else:
            if axis not in FIELDS and not scale_field(axis):
                coerce_value(axis, None, src)  # raises: unknown key, with a close match
            vals = values if isinstance(values, list) else [values]
            if not vals:
                raise ParamsError(f"{src}: axis '{axis}' has no values")
            out.append((axis, [(v, {axis: v}) for v in vals]))
    return out


def path_for_notebooks(path: Path, project: Path) -> str:
    """A path as the notebooks see it (they run in the project root): relative when inside it."""
    try:
        return str(path.resolve().relative_to(project.resolve()))
    except ValueError:
        return str(path.resolve())


def _value_of(run_params: RunParams, labels: Mapping[str, Any], key: str, source: str) -> Any:
    if key in FIELDS:
        return getattr(run_params, key)
    if key in labels:
        return labels[key]
    raise ParamsError(f"{source}: cannot match on '{key}': not a RunParams key nor an axis of this run")


def expand(project: str | Path, profile: str | Path = "smoke", *, params_dir: str | Path | None = None,
           notebooks_dir: str | Path | None = None, outputs: str | Path | None = None) -> Study:
    """Expand every experiment file under a profile into the study's runs, in dependency order."""
    project = Path(project)
    params_dir = Path(params_dir) if params_dir else project / "params"
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else project / "notebooks"
    outputs = Path(outputs) if outputs else project / "outputs"
    profile_file = find_profile(project, profile)
    profile_src = display_path(profile_file, project)
    flat, study = read_profile(profile_file)
    check_keys(study, STUDY_KEYS, profile_src, "study")
    presets = study.get("presets") or {}
    if not isinstance(presets, dict):
        raise ParamsError(f"{profile_src}: study.presets must be a mapping of name -> keys")
    tasks = study.get("tasks") or {}
    for task in tasks:
        coerce_value("task", task, f"{profile_src}: study.tasks")
    ctx = Context(presets, profile_src)
    profile_layers = ctx.layers(flat, profile_src)
    if any(layer.deps for layer in profile_layers):
        raise ParamsError(f"{profile_src}: a profile's top-level keys cannot depend on runs")

    groups = order_groups(load_groups(project, params_dir, notebooks_dir, study, profile_src), ctx)
    runs_by_group: dict[str, list[Run]] = {}
    all_runs: dict[str, Run] = {}

    for group in groups:
        base = group.spec.get("base") or {}
        base_layers = ctx.layers(base, f"{group.source}.base", allow_each=True)
        each = [(k, spec, layer.source) for layer in base_layers for k, spec in layer.deps.items() if "each" in spec]
        if len(each) > 1:
            raise ParamsError(f"{group.source}.base: at most one dependency may use 'each'")
        upstream: list[Run | None] = [None]
        if each:
            key, spec, source = each[0]
            upstream = runs_by_group[target_key(spec["group"], group.experiment)]
            if not upstream:
                raise ParamsError(f"{source}.{key}: group '{spec['group']}' has no runs")
        axes = _axes(group)
        group_runs: list[Run] = []
        for up in upstream:
            for combo in itertools.product(*[values for _, values in axes]):
                labels: dict[str, Any] = {}
                layers = list(base_layers)
                if up is not None:
                    key, spec, source = each[0]
                    copy_keys = spec["each"] if isinstance(spec["each"], list) else [spec["each"]]
                    copied = Layer(f"{source}.{key} (each)")
                    for k in copy_keys:
                        copied.values[k] = _value_of(up.params, up.labels, k, f"{source}.{key}.each")
                        labels[k] = copied.values[k]
                    # the upstream run's other coordinates, e.g. init_from.sft_loss=tv
                    labels.update({f"{key}.{k}": v for k, v in up.labels.items() if k not in copy_keys})
                for (axis, _), (label, mapping) in zip(axes, combo):
                    labels[axis] = label
                    layers += ctx.layers(mapping, f"{group.source}.grid.{axis}.{label}")
                if up is not None:
                    layers.append(copied)  # the upstream's values win: a DPO run has its SFT run's task
                group_runs.append(_resolve_run(group, profile_layers, tasks, ctx, profile_src, layers, labels,
                                               up, runs_by_group, project, outputs))
        design = train_size_design(group.spec, group.source)
        if design == "fixed_epochs" and group_runs:
            largest = max(r.params.train_size for r in group_runs)
            for run in group_runs:
                run.params = fixed_epochs(run.params, largest, group.source)
        if "train_size_design" in group.spec:
            for run in group_runs:
                run.labels["train_size_design"] = design
        for run in group_runs:
            if run.run_id in all_runs:
                first = all_runs[run.run_id]
                if group.key != first.group and group.key not in first.also_groups:
                    first.also_groups.append(group.key)
            else:
                all_runs[run.run_id] = run
        runs_by_group[group.key] = [all_runs[r.run_id] for r in group_runs]
    jobs = study.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParamsError(f"{profile_src}: study.jobs must be an integer >= 1, got {jobs!r}")
    return Study(list(all_runs.values()), project, outputs, profile_file, jobs)


def _resolve_run(group, profile_layers, tasks, ctx, profile_src, layers, labels, up, runs_by_group,
                 project, outputs) -> Run:
    """One run's params from its layers; dependencies bound to the run directories they match."""
    def resolve(all_layers: list[Layer], extra: dict[str, Any]) -> RunParams:
        scales = {k: (v, layer.source) for layer in all_layers for k, v in layer.scales.items()}
        params = resolve_params([(layer.source, layer.values) for layer in all_layers]
                                 + [("study", {"experiment": group.experiment, **extra})])
        return apply_scales(params, scales)

    # The task decides which `study.tasks` keys apply: find it, then resolve for real.
    task = resolve(profile_layers + layers, {}).task
    stack = profile_layers + ctx.layers(tasks.get(task), f"{profile_src}: study.tasks.{task}") + layers
    provisional = resolve(stack, {})

    deps: dict[str, str] = {}
    bound: dict[str, str] = {}
    dep_specs = {k: (spec, layer.source) for layer in stack for k, spec in layer.deps.items()}
    for key, (spec, source) in dep_specs.items():
        group_key = target_key(spec["group"], group.experiment)
        if "each" in spec:
            target = up
        else:
            candidates = runs_by_group[group_key]
            conditions = {}
            for k in spec.get("match", []) or []:
                conditions[k] = _value_of(provisional, labels, k, f"{source}.{key}.match")
            for k, v in (spec.get("where") or {}).items():
                conditions[k] = coerce_value(k, v, f"{source}.{key}.where") if k in FIELDS else v
            hits = [r for r in candidates
                    if all(_value_of(r.params, r.labels, k, f"{source}.{key}") == v for k, v in conditions.items())]
            if len(hits) != 1:
                want = ", ".join(f"{k}={v}" for k, v in conditions.items()) or "no conditions"
                problem = "no run" if not hits else f"{len(hits)} runs"
                raise ParamsError(f"{source}: key '{key}': {problem} of group {group_key} with {want} "
                                  f"(it has {len(candidates)} runs; check its grid and `match`)")
            target = hits[0]
        deps[key] = target.run_id
        bound[key] = path_for_notebooks(outputs / target.experiment / target.run_id, project)
    params = resolve(stack, bound)
    return Run(group.experiment, group.key, params, group.notebook, labels, deps)


def run_summary(run: Run) -> str:
    """The params that tell runs apart, for humans (`--list`, progress lines)."""
    p = run.params
    bits = [f"{k}={v}" for k, v in run.labels.items()]
    for key in ("objective", "task"):
        if key not in run.labels:
            bits.insert(0, f"{key}={getattr(p, key)}")
    return " ".join(bits)


__all__ = ["Run", "Study", "expand", "find_profile", "experiment_files", "path_for_notebooks", "run_summary"]
