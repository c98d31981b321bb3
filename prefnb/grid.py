"""Study grids: a profile plus the experiment files in ``params/`` → an ordered list of runs.

Pure: reads YAML, loads no model, touches no outputs (``prefnb study --list`` is this module).
The format below and its expansion are one module because they change together.

Experiment file (``params/<experiment>.yaml``; the file name is the experiment name)::

    notebook: 03_staged.ipynb          # in notebooks/
    description: Does DPO after SFT add to SFT?
    groups:                            # one or more run groups
      staged:
        description: ...               # optional
        notebook: 01_sft.ipynb         # optional, overrides the file's notebook for this group
        train_size_design: fixed_epochs  # optional (06): see "Training-set size" below
        base:                          # flat RunParams keys shared by the group's runs
          use: preference              # merge the profile's preset `preference` (see below)
          objective: dpo
          init_from: {group: 01_sft/sft, match: [task, lora_r, seed]}   # a dependency
        grid:                          # axes; the group's runs are their cartesian product
          task: [paraphrase, sonnets]  # a RunParams key: a list of values
          finetuning:                  # a named axis: label -> mapping of keys
            fft: {lora_r: 0}
            lora: {use: lora}
          seed: [0, 1, 2]

Values of keys
- ``use: NAME`` (or a list of names): the profile's ``study.presets.NAME`` keys, applied
  before the mapping's own keys (presets may ``use`` other presets and hold dependencies:
  the smoke profile's stand-in for an instruction-tuned model is a run of its own study).
- ``<key>_scale: x`` for a numeric RunParams key (e.g. ``learning_rate_scale``,
  ``max_steps_scale``): multiplies that key's resolved value (ints are rounded, at least 1).
  It may be an axis (07: SFT learning rate 1×, ¼×, 1/16×). The last one set wins.
- a dependency (only for ``init_from`` and ``reference``): ``{group: [EXPERIMENT/]GROUP, ...}``
  binds the key to the run directory of a run of that group, which then runs first:
    ``match: [keys]`` the one run whose values of these keys (RunParams keys or axis names)
                      equal this run's; ``where: {key: value}`` fixes others;
    ``each: [keys]``  (in ``base`` only) one run of this group per run of that group,
                      copying these keys from it (07: one DPO per SFT run).
  No run, or several, matching is an error that names the file and the key.

Training-set size: ``train_size_design`` says what a group that varies ``train_size`` holds
fixed (only 06 uses it; kept because the paper quotes the design, the run label
``train_size_design``, and a profile may switch it). ``fixed_steps`` (the default): every run
takes ``max_steps``, so a smaller set is seen for more epochs. ``fixed_epochs``: ``max_steps``
is the budget of the group's largest fraction f_max; a run with fraction f takes
``max_steps · f / f_max`` steps (at least 1), and ``warmup_steps``, ``eval_every`` and
``save_every`` shrink with it (0, off, stays 0), so every size is seen for the same epochs.

Profile (``params/profiles/<name>.yaml``): flat RunParams keys, then ``study:``::

    study:
      jobs: 2                              # runs at a time (`prefnb study --jobs` overrides)
      presets: {preference: {learning_rate: 1.0e-4}, instruct: {model: vicgalle/gpt2-alpaca}}
      tasks: {sonnets: {max_steps: 300}}   # per-task keys, after the profile's, before the groups'
      grid: {seed: [0]}                    # replaces that axis in every group that has it
      experiments:                         # per-group overrides
        06_dpo_variants:
          variants: {grid: {scenario: [after_sft], train_size: [1.0]}}  # named axis: keep labels
          scenarios: {extends: variants, grid: {objective: [dpo]}}       # a new group, copied
          some_group: {skip: true}
        # an override's `base` is merged key by key; `grid` replaces the axes it names
        # (`null` removes one; a list of labels keeps those of a named axis). `extends` copies
        # the group as the profile left it so far: its overrides, and only the labels they kept.

Order of layers for one run (later wins): RunParams defaults → profile keys →
``study.tasks.<task>`` → group base (presets first) → grid axes in order → keys copied by
``each`` → dependency run directories → ``experiment`` = the file's name. Every key is
validated by :mod:`prefnb.config`, so an unknown key fails naming its file. The params are
resolved once per run; scales, the training-set design and the dependencies' directories
are then applied to that one record.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from prefnb.config import (FIELDS, TYPE_HINTS, ParamsError, RunParams, coerce_value, profile_path, read_profile,
                           read_yaml_mapping, resolve_params)

DEPENDENCY_KEYS = ("init_from", "reference")
EXPERIMENT_KEYS = {"notebook", "description", "groups"}
GROUP_KEYS = {"notebook", "description", "base", "grid", "train_size_design"}
OVERRIDE_KEYS = GROUP_KEYS | {"extends", "skip"}
STUDY_KEYS = {"presets", "tasks", "grid", "experiments", "description", "jobs"}
DEP_SPEC_KEYS = {"group", "match", "where", "each"}
TRAIN_SIZE_DESIGNS = ("fixed_steps", "fixed_epochs")
STEP_KEYS = ("max_steps", "warmup_steps", "eval_every", "save_every")  # counted in optimizer steps


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


def experiment_files(params_dir: Path) -> dict[str, Path]:
    """Experiment name -> file: every ``*.yaml`` directly in params/, in name order."""
    return {p.stem: p for p in sorted(params_dir.glob("*.yaml"))}


def path_for_notebooks(path: Path, project: Path) -> str:
    """A path as the notebooks (which run in the project root) and error messages show it:
    relative when inside the project."""
    try:
        return str(path.resolve().relative_to(project.resolve()))
    except ValueError:
        return str(path.resolve())


def _check_keys(mapping: Any, allowed: set[str], source: str, what: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{source}: {what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise ParamsError(f"{source}: unknown key '{key}' in {what} (allowed: {', '.join(sorted(allowed))})")
    return mapping


# --- keys, presets, scales, dependencies
def _scale_field(key: str) -> str | None:
    """'learning_rate_scale' -> 'learning_rate' when that is a numeric RunParams key."""
    name = key[: -len("_scale")]
    if key.endswith("_scale") and name in FIELDS and TYPE_HINTS[name] in (int, float):
        return name
    return None


@dataclass
class _Layer:
    """Keys from one place: plain values, scales, dependency specs."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    deps: dict[str, dict] = field(default_factory=dict)


class _Presets:
    """The profile's ``study.presets``: turns a mapping of keys into layers."""

    def __init__(self, presets: Mapping[str, Any], source: str):
        self.presets, self.source = presets, source

    def layers(self, mapping: Any, source: str, *, allow_each: bool = False, _seen: tuple = ()) -> list[_Layer]:
        """A mapping of keys → layers (its presets first, then its own keys), each key checked."""
        if mapping is None:
            return []
        if not isinstance(mapping, dict):
            raise ParamsError(f"{source}: must be a mapping of RunParams keys, got {mapping!r}")
        out: list[_Layer] = []
        uses = mapping.get("use", [])
        for name in [uses] if isinstance(uses, str) else uses:
            if name not in self.presets:
                known = ", ".join(sorted(self.presets)) or "none"
                raise ParamsError(f"{source}: key 'use' names preset '{name}', which the profile does not define "
                                  f"in study.presets (defined: {known})")
            if name in _seen:
                raise ParamsError(f"{self.source}: preset '{name}' uses itself")
            out += self.layers(self.presets[name], f"{self.source}: study.presets.{name}", _seen=_seen + (name,))
        own = _Layer(source)
        for key, value in mapping.items():
            if key == "use":
                continue
            if key == "experiment":
                raise ParamsError(f"{source}: key 'experiment' is set by the study (the experiment file's name)")
            if isinstance(value, dict) and "group" in value:  # a dependency
                if key not in DEPENDENCY_KEYS:
                    raise ParamsError(f"{source}: key '{key}' cannot depend on a run "
                                      f"(only {', '.join(DEPENDENCY_KEYS)})")
                _check_keys(value, DEP_SPEC_KEYS, source, f"the dependency of '{key}'")
                if "each" in value and not allow_each:
                    raise ParamsError(f"{source}: key '{key}': 'each' is allowed only in a group's base")
                if "each" in value and ("match" in value or "where" in value):
                    raise ParamsError(f"{source}: key '{key}': use either 'each' or 'match'/'where', not both")
                own.deps[key] = value
            elif _scale_field(str(key)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ParamsError(f"{source}: key '{key}' must be a number > 0, got {value!r}")
                own.scales[key] = float(value)
            else:
                coerce_value(str(key), value, source)  # fail early, naming the file
                own.values[key] = value
        return out + [own]


def _apply_scales(params: RunParams, layers: list[_Layer]) -> RunParams:
    changes = {}
    for key, (scale, source) in {k: (v, layer.source) for layer in layers for k, v in layer.scales.items()}.items():
        name = _scale_field(key)
        value = getattr(params, name) * scale
        if isinstance(getattr(params, name), int):
            value = max(1, int(round(value)))
        changes[name] = coerce_value(name, value, f"{source} ({key})")
    return replace(params, **changes) if changes else params


def _fixed_epochs(params: RunParams, largest_train_size: float, source: str) -> RunParams:
    """The run's step-counted keys scaled by train_size / largest_train_size (``fixed_epochs``):
    as many epochs as the largest size gets from ``max_steps``. At least 1 step; 0 (off) stays 0."""
    fraction = params.train_size / largest_train_size
    changes = {key: max(1, round(getattr(params, key) * fraction)) for key in STEP_KEYS if getattr(params, key)}
    return replace(params, **{k: coerce_value(k, v, f"{source} (train_size_design: fixed_epochs)")
                              for k, v in changes.items()})


def _train_size_design(spec: dict, source: str) -> str:
    design = spec.get("train_size_design", "fixed_steps")
    if design not in TRAIN_SIZE_DESIGNS:
        raise ParamsError(f"{source}: key 'train_size_design' must be one of {', '.join(TRAIN_SIZE_DESIGNS)}, "
                          f"got {design!r}")
    return design


def _target_key(name: str, experiment: str) -> str:
    return name if "/" in name else f"{experiment}/{name}"


# --- groups: the file's, with the profile's overrides
@dataclass
class _Group:
    experiment: str
    name: str
    spec: dict
    source: str              # "params/03_staged.yaml: groups.staged"
    notebook: Path
    base: list[_Layer] = field(default_factory=list)      # the base's layers, presets first
    axes: list[tuple[str, list[tuple[Any, list[_Layer]]]]] = field(default_factory=list)  # [(axis, [(label, layers)])]

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.name}"


def _apply_override(spec: dict, override: dict, source: str, *, global_grid: bool = False) -> dict:
    """``spec`` with a profile's override applied (a list for a named axis picks its labels)."""
    spec = copy.deepcopy(spec)
    spec.update({k: override[k] for k in ("description", "notebook", "train_size_design") if k in override})
    if override.get("base"):
        if not isinstance(override["base"], dict):
            raise ParamsError(f"{source}: key 'base' must be a mapping")
        spec["base"] = {**(spec.get("base") or {}), **override["base"]}
    grid_over = override.get("grid") or {}
    if not isinstance(grid_over, dict):
        raise ParamsError(f"{source}: key 'grid' must be a mapping of axes")
    grid = dict(spec.get("grid") or {})
    for axis, values in grid_over.items():
        if global_grid and axis not in grid:
            continue
        if values is None:
            grid.pop(axis, None)
            continue
        full = grid.get(axis)
        if isinstance(full, dict) and isinstance(values, list):  # a subset of a named axis' labels
            unknown = [label for label in values if label not in full]
            if unknown:
                raise ParamsError(f"{source}: grid.{axis}: axis '{axis}' has no label {unknown[0]!r} "
                                  f"(labels: {', '.join(map(str, full))})")
            values = {label: full[label] for label in values}
        grid[axis] = values
    spec["grid"] = grid
    return spec


def _load_groups(project: Path, params_dir: Path, notebooks_dir: Path, study: dict, profile_src: str) -> list[_Group]:
    files = experiment_files(params_dir)
    if not files:
        raise ParamsError(f"{params_dir}: no experiment files (*.yaml)")
    overrides = study.get("experiments") or {}
    if not isinstance(overrides, dict):
        raise ParamsError(f"{profile_src}: study.experiments must be a mapping of experiment -> groups")
    for exp in overrides:
        if exp not in files:
            raise ParamsError(f"{profile_src}: study.experiments names experiment '{exp}', which has no file in "
                              f"{params_dir} (experiments: {', '.join(files)})")
    global_grid = study.get("grid") or {}
    groups: list[_Group] = []
    for exp, path in files.items():
        src = path_for_notebooks(path, project)
        data = _check_keys(read_yaml_mapping(path), EXPERIMENT_KEYS, src, "an experiment file")
        if "notebook" not in data:
            raise ParamsError(f"{src}: missing key 'notebook' (the notebook in "
                              f"{path_for_notebooks(notebooks_dir, project)}/ it runs)")
        specs = data.get("groups")
        if not isinstance(specs, dict) or not specs:
            raise ParamsError(f"{src}: key 'groups' must be a mapping of one or more run groups")
        specs = {name: _check_keys(spec, GROUP_KEYS, f"{src}: groups.{name}", "a group")
                 for name, spec in specs.items()}
        exp_over = overrides.get(exp) or {}
        if not isinstance(exp_over, dict):
            raise ParamsError(f"{profile_src}: study.experiments.{exp} must be a mapping of group -> override")
        if global_grid:
            specs = {name: _apply_override(spec, {"grid": global_grid}, f"{profile_src}: study.grid", global_grid=True)
                     for name, spec in specs.items()}
        skip = set()
        for name, over in exp_over.items():
            osrc = f"{profile_src}: study.experiments.{exp}.{name}"
            over = _check_keys(over, OVERRIDE_KEYS, osrc, "a group override")
            if "extends" in over:  # a copy of that group as the profile left it so far
                if over["extends"] not in specs:
                    raise ParamsError(f"{osrc}: key 'extends' names group '{over['extends']}', not in {src} "
                                      f"(groups: {', '.join(specs)})")
                specs[name] = copy.deepcopy(specs[over["extends"]])
            elif name not in specs:
                raise ParamsError(f"{osrc}: experiment {exp} has no group '{name}' (groups: {', '.join(specs)}); "
                                  "add `extends: GROUP` to make a new one")
            if over.get("skip"):
                skip.add(name)
            specs[name] = _apply_override(specs[name], over, osrc)
        groups += [_Group(exp, name, spec, f"{src}: groups.{name}",
                          notebooks_dir / spec.get("notebook", data["notebook"]))
                   for name, spec in specs.items() if name not in skip]
    return groups


def _axes(group: _Group, presets: _Presets) -> list[tuple[str, list[tuple[Any, list[_Layer]]]]]:
    """[(axis, [(label, layers)])] for a group's grid."""
    out = []
    for axis, values in (group.spec.get("grid") or {}).items():
        src = f"{group.source}.grid.{axis}"
        if isinstance(values, dict):  # a named axis: label -> mapping of keys
            if axis in FIELDS or _scale_field(axis):
                raise ParamsError(f"{src}: axis '{axis}' is a RunParams key: give a list of values, not a mapping")
            labelled = values.items()
        else:
            if axis not in FIELDS and not _scale_field(axis):
                coerce_value(axis, None, src)  # raises: unknown key, with a close match
            labelled = [(v, {axis: v}) for v in (values if isinstance(values, list) else [values])]
            if not labelled:
                raise ParamsError(f"{src}: axis '{axis}' has no values")
        out.append((axis, [(label, presets.layers(mapping or {}, f"{src}.{label}")) for label, mapping in labelled]))
    return out


def _order_groups(groups: list[_Group]) -> list[_Group]:
    """Groups in dependency order (via base, axes and presets), keeping file order where free."""
    keys = {g.key: g for g in groups}
    deps: dict[str, list[str]] = {}
    for group in groups:
        deps[group.key] = []
        axis_layers = [layer for _, labelled in group.axes for _, layers in labelled for layer in layers]
        for layer in group.base + axis_layers:
            for key, spec in layer.deps.items():
                target = _target_key(spec["group"], group.experiment)
                if target not in keys:
                    raise ParamsError(f"{layer.source}.{key}: depends on group '{spec['group']}', which is not "
                                      f"in the study (groups: {', '.join(keys)})")
                deps[group.key].append(target)
    done: list[str] = []
    remaining = [g.key for g in groups]
    while remaining:  # Kahn's algorithm
        ready = next((k for k in remaining if all(d in done for d in deps[k])), None)
        if ready is None:
            raise ParamsError(f"{keys[remaining[0]].source}: groups depend on each other in a cycle: "
                              f"{', '.join(remaining)}")
        done.append(ready)
        remaining.remove(ready)
    return [keys[k] for k in done]


# --- expansion
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
    profile_file = profile_path(profile, project)
    profile_src = path_for_notebooks(profile_file, project)
    flat, study = read_profile(profile_file)
    _check_keys(study, STUDY_KEYS, profile_src, "study")
    presets = study.get("presets") or {}
    if not isinstance(presets, dict):
        raise ParamsError(f"{profile_src}: study.presets must be a mapping of name -> keys")
    tasks = study.get("tasks") or {}
    for task in tasks:
        coerce_value("task", task, f"{profile_src}: study.tasks")
    presets = _Presets(presets, profile_src)
    profile_layers = presets.layers(flat, profile_src)
    if any(layer.deps for layer in profile_layers):
        raise ParamsError(f"{profile_src}: a profile's top-level keys cannot depend on runs")

    groups = _load_groups(project, params_dir, notebooks_dir, study, profile_src)
    for group in groups:  # every key of every group checked once, before any run is resolved
        group.base = presets.layers(group.spec.get("base") or {}, f"{group.source}.base", allow_each=True)
        group.axes = _axes(group, presets)
    runs_by_group: dict[str, list[Run]] = {}
    all_runs: dict[str, Run] = {}
    for group in _order_groups(groups):
        each = [(k, spec, layer.source) for layer in group.base for k, spec in layer.deps.items() if "each" in spec]
        if len(each) > 1:
            raise ParamsError(f"{group.source}.base: at most one dependency may use 'each'")
        upstream: list[Run | None] = [None]
        if each:
            key, spec, source = each[0]
            upstream = runs_by_group[_target_key(spec["group"], group.experiment)]
            if not upstream:
                raise ParamsError(f"{source}.{key}: group '{spec['group']}' has no runs")
        group_runs: list[Run] = []
        for up in upstream:
            up_labels: dict[str, Any] = {}
            copied: list[_Layer] = []
            if up is not None:
                key, spec, source = each[0]
                copy_keys = spec["each"] if isinstance(spec["each"], list) else [spec["each"]]
                up_labels = {k: _value_of(up.params, up.labels, k, f"{source}.{key}.each") for k in copy_keys}
                copied = [_Layer(f"{source}.{key} (each)", values=dict(up_labels))]
                # the upstream run's other coordinates, e.g. init_from.sft_loss=tv
                up_labels.update({f"{key}.{k}": v for k, v in up.labels.items() if k not in copy_keys})
            for combo in itertools.product(*[labelled for _, labelled in group.axes]):
                labels, layers = dict(up_labels), list(group.base)
                for (axis, _), (label, axis_layers) in zip(group.axes, combo):
                    labels[axis] = label
                    layers += axis_layers
                layers += copied  # the upstream's values win: a DPO run has its SFT run's task
                stack = _profile_stack(profile_layers, layers, tasks, presets) + layers
                params = _apply_scales(resolve_params([(layer.source, layer.values) for layer in stack]
                                                      + [("study", {"experiment": group.experiment})]), stack)
                targets = _dependencies(group, stack, params, labels, up, runs_by_group)
                bound = {key: coerce_value(key, path_for_notebooks(outputs / t.experiment / t.run_id, project), "study")
                         for key, t in targets.items()}
                group_runs.append(Run(group.experiment, group.key, replace(params, **bound) if bound else params,
                                      group.notebook, labels, {key: t.run_id for key, t in targets.items()}))
        design = _train_size_design(group.spec, group.source)
        if design == "fixed_epochs" and group_runs:
            largest = max(r.params.train_size for r in group_runs)
            for run in group_runs:
                run.params = _fixed_epochs(run.params, largest, group.source)
        for run in group_runs:
            if "train_size_design" in group.spec:
                run.labels["train_size_design"] = design
            first = all_runs.setdefault(run.run_id, run)
            if first is not run and group.key != first.group and group.key not in first.also_groups:
                first.also_groups.append(group.key)
        runs_by_group[group.key] = [all_runs[r.run_id] for r in group_runs]
    jobs = study.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParamsError(f"{profile_src}: study.jobs must be an integer >= 1, got {jobs!r}")
    return Study(list(all_runs.values()), project, outputs, profile_file, jobs)


def _profile_stack(profile_layers: list[_Layer], layers: list[_Layer], tasks: dict, presets: _Presets) -> list[_Layer]:
    """The profile's layers, then its ``study.tasks`` keys for the task that the last layer setting it names."""
    task = next((layer.values["task"] for layer in reversed(profile_layers + layers) if "task" in layer.values),
                FIELDS["task"].default)
    return profile_layers + presets.layers(tasks.get(task), f"{presets.source}: study.tasks.{task}")


def _dependencies(group: _Group, stack: list[_Layer], params: RunParams, labels: Mapping[str, Any],
                  up: Run | None, runs_by_group: Mapping[str, list[Run]]) -> dict[str, Run]:
    """The run each dependency of ``stack`` binds its key to, matched on ``params`` (before binding)."""
    targets: dict[str, Run] = {}
    for key, (spec, source) in {k: (spec, layer.source) for layer in stack for k, spec in layer.deps.items()}.items():
        if "each" in spec:
            targets[key] = up
            continue
        group_key = _target_key(spec["group"], group.experiment)
        candidates = runs_by_group[group_key]
        conditions = {k: _value_of(params, labels, k, f"{source}.{key}.match") for k in spec.get("match") or []}
        for k, v in (spec.get("where") or {}).items():
            conditions[k] = coerce_value(k, v, f"{source}.{key}.where") if k in FIELDS else v
        hits = [r for r in candidates
                if all(_value_of(r.params, r.labels, k, f"{source}.{key}") == v for k, v in conditions.items())]
        if len(hits) != 1:
            want = ", ".join(f"{k}={v}" for k, v in conditions.items()) or "no conditions"
            problem = "no run" if not hits else f"{len(hits)} runs"
            raise ParamsError(f"{source}: key '{key}': {problem} of group {group_key} with {want} "
                              f"(it has {len(candidates)} runs; check its grid and `match`)")
        targets[key] = hits[0]
    return targets


def run_summary(run: Run) -> str:
    """The params that tell runs apart, for humans (`--list`, progress lines)."""
    unlabelled = [f"{key}={getattr(run.params, key)}" for key in ("task", "objective") if key not in run.labels]
    return " ".join(unlabelled + [f"{k}={v}" for k, v in run.labels.items()])
