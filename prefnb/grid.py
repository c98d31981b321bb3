"""Study grids: a profile plus the experiment files in ``params/`` → an ordered list of runs.

Pure: reads YAML, loads no model, touches no outputs. ``prefnb study --list`` is this module.

Experiment file (``params/<experiment>.yaml``; the file name is the experiment name)::

    notebook: 03_staged.ipynb          # in notebooks/
    description: Does DPO after SFT add to SFT?
    groups:                            # one or more run groups
      staged:
        description: ...               # optional
        notebook: 01_sft.ipynb         # optional, overrides the file's notebook for this group
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
  before the mapping's own keys (presets may ``use`` other presets and hold dependencies).
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
        # (`null` removes one; a list of labels keeps those of a named axis).

Order of layers for one run (later wins): RunParams defaults → profile keys →
``study.tasks.<task>`` → group base (presets first) → grid axes in order → keys copied by
``each`` → dependency run directories → ``experiment`` = the file's name. Every key is
validated by :mod:`prefnb.config` (as in ``resolve_params``), so an unknown key fails naming its file.
"""

from __future__ import annotations

import copy
import functools
import itertools
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from prefnb.config import (FIELDS, ParamsError, RunParams, coerce_value, read_profile, read_yaml_mapping,
                           resolve_params)

DEPENDENCY_KEYS = ("init_from", "reference")
EXPERIMENT_KEYS = {"notebook", "description", "groups"}
GROUP_KEYS = {"notebook", "description", "base", "grid"}
OVERRIDE_KEYS = GROUP_KEYS | {"extends", "skip"}
STUDY_KEYS = {"presets", "tasks", "grid", "experiments", "description", "jobs"}
DEP_SPEC_KEYS = {"group", "match", "where", "each"}


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
# reading files
# ---------------------------------------------------------------------------------------
def find_profile(project: Path, profile: str | Path) -> Path:
    """A profile name (looked up in <project>/params/profiles) or a path to a YAML file."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ParamsError(f"{p}: profile file not found")
        return p
    candidate = project / "params" / "profiles" / f"{profile}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in candidate.parent.glob("*.yaml"))
        raise ParamsError(f"profile '{profile}' not found in {candidate.parent} (known: {', '.join(known) or 'none'})")
    return candidate


def experiment_files(params_dir: Path) -> dict[str, Path]:
    """Experiment name -> file: every ``*.yaml`` directly in params/, in name order."""
    return {p.stem: p for p in sorted(params_dir.glob("*.yaml"))}


def _display(path: Path, project: Path) -> str:
    try:
        return str(path.resolve().relative_to(project.resolve()))
    except ValueError:
        return str(path)


def _check_keys(mapping: Any, allowed: set[str], source: str, what: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{source}: {what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise ParamsError(f"{source}: unknown key '{key}' in {what} (allowed: {', '.join(sorted(allowed))})")
    return mapping


# ---------------------------------------------------------------------------------------
# keys, presets, scales, dependencies
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _scale_field(key: str) -> str | None:
    """'learning_rate_scale' -> 'learning_rate' when that is a numeric RunParams key."""
    if key.endswith("_scale") and key[: -len("_scale")] in FIELDS:
        name = key[: -len("_scale")]
        if typing.get_type_hints(RunParams)[name] in (int, float):
            return name
    return None


def _is_dependency(value: Any) -> bool:
    return isinstance(value, dict) and "group" in value


@dataclass
class _Layer:
    """Keys from one place: plain values, scales, dependency specs."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    deps: dict[str, dict] = field(default_factory=dict)


class _Context:
    def __init__(self, presets: Mapping[str, Any], presets_source: str):
        self.presets = presets
        self.presets_source = presets_source

    def layers(self, mapping: Any, source: str, *, allow_each: bool = False, _seen: tuple = ()) -> list[_Layer]:
        """A mapping of keys → layers (its presets first, then its own keys)."""
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
                raise ParamsError(f"{self.presets_source}: preset '{name}' uses itself")
            out += self.layers(self.presets[name], f"{self.presets_source}: study.presets.{name}",
                               _seen=_seen + (name,))
        own = _Layer(source)
        for key, value in mapping.items():
            if key == "use":
                continue
            if key == "experiment":
                raise ParamsError(f"{source}: key 'experiment' is set by the study (the experiment file's name)")
            if _is_dependency(value):
                if key not in DEPENDENCY_KEYS:
                    raise ParamsError(f"{source}: key '{key}' cannot depend on a run (only {', '.join(DEPENDENCY_KEYS)})")
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


def _apply_scales(params: RunParams, scales: Mapping[str, tuple[float, str]]) -> RunParams:
    changes = {}
    for key, (scale, source) in scales.items():
        name = _scale_field(key)
        value = getattr(params, name) * scale
        if isinstance(getattr(params, name), int):
            value = max(1, int(round(value)))
        changes[name] = coerce_value(name, value, f"{source} ({key})")
    return replace(params, **changes) if changes else params


# ---------------------------------------------------------------------------------------
# groups: the file's, with the profile's overrides
# ---------------------------------------------------------------------------------------
@dataclass
class _Group:
    experiment: str
    name: str
    spec: dict
    source: str              # "params/03_staged.yaml: groups.staged"
    notebook: Path

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.name}"


def _override_axis(axis: str, old: Any, new: Any, source: str) -> Any:
    """A profile's value for an axis: values, a subset of a named axis' labels, or a new mapping."""
    if isinstance(old, dict) and isinstance(new, list):
        unknown = [label for label in new if label not in old]
        if unknown:
            raise ParamsError(f"{source}: axis '{axis}' has no label {unknown[0]!r} (labels: {', '.join(map(str, old))})")
        return {label: old[label] for label in new}
    return new


def _apply_override(spec: dict, override: dict, source: str, *, global_grid: bool = False,
                    original: dict | None = None) -> dict:
    """``spec`` with a profile's override applied; labels of named axes are looked up in
    ``original`` (the file's group), so a group made with `extends` may pick any of them."""
    spec = copy.deepcopy(spec)
    if "description" in override:
        spec["description"] = override["description"]
    if "notebook" in override:
        spec["notebook"] = override["notebook"]
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
        else:
            full = ((original or {}).get("grid") or {}).get(axis, grid.get(axis))
            grid[axis] = _override_axis(axis, full if isinstance(full, dict) else grid.get(axis), values,
                                        f"{source}: grid.{axis}")
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
        src = _display(path, project)
        data = _check_keys(read_yaml_mapping(path), EXPERIMENT_KEYS, src, "an experiment file")
        if "notebook" not in data:
            raise ParamsError(f"{src}: missing key 'notebook' (the notebook in {_display(notebooks_dir, project)}/ it runs)")
        specs = data.get("groups")
        if not isinstance(specs, dict) or not specs:
            raise ParamsError(f"{src}: key 'groups' must be a mapping of one or more run groups")
        specs = {name: _check_keys(spec, GROUP_KEYS, f"{src}: groups.{name}", "a group") for name, spec in specs.items()}
        skip = set()
        exp_over = overrides.get(exp) or {}
        if not isinstance(exp_over, dict):
            raise ParamsError(f"{profile_src}: study.experiments.{exp} must be a mapping of group -> override")
        original = copy.deepcopy(specs)  # the file's groups, before any override
        for name, spec in list(specs.items()):
            if global_grid:
                specs[name] = _apply_override(spec, {"grid": global_grid}, f"{profile_src}: study.grid", global_grid=True)
        for name, over in exp_over.items():
            osrc = f"{profile_src}: study.experiments.{exp}.{name}"
            over = _check_keys(over, OVERRIDE_KEYS, osrc, "a group override")
            if "extends" in over:  # a copy of that group as the profile left it so far
                if over["extends"] not in specs:
                    raise ParamsError(f"{osrc}: key 'extends' names group '{over['extends']}', not in {src} "
                                      f"(groups: {', '.join(specs)})")
                original[name] = original.get(over["extends"], {})
                specs[name] = copy.deepcopy(specs[over["extends"]])
            elif name not in specs:
                raise ParamsError(f"{osrc}: experiment {exp} has no group '{name}' (groups: {', '.join(specs)}); "
                                  "add `extends: GROUP` to make a new one")
            if over.get("skip"):
                skip.add(name)
            specs[name] = _apply_override(specs[name], over, osrc, original=original.get(name))
        for name, spec in specs.items():
            if name not in skip:
                notebook = notebooks_dir / spec.get("notebook", data["notebook"])
                groups.append(_Group(exp, name, spec, f"{src}: groups.{name}", notebook))
    return groups


def _group_deps(group: _Group, ctx: _Context, keys: dict[str, _Group]) -> list[str]:
    """Keys of the groups this group's runs depend on (via base, axes and presets)."""
    found: list[tuple[str, dict]] = []

    def scan(mapping: Any, source: str, allow_each: bool = False) -> None:
        for layer in ctx.layers(mapping, source, allow_each=allow_each):
            found.extend((f"{layer.source}.{k}", spec) for k, spec in layer.deps.items())

    scan(group.spec.get("base"), f"{group.source}.base", allow_each=True)
    for axis, values in (group.spec.get("grid") or {}).items():
        if isinstance(values, dict):
            for label, mapping in values.items():
                scan(mapping, f"{group.source}.grid.{axis}.{label}")
    out = []
    for source, spec in found:
        target = _target_key(spec["group"], group.experiment)
        if target not in keys:
            raise ParamsError(f"{source}: depends on group '{spec['group']}', which is not in the study "
                              f"(groups: {', '.join(keys)})")
        out.append(target)
    return out


def _target_key(name: str, experiment: str) -> str:
    return name if "/" in name else f"{experiment}/{name}"


def _order_groups(groups: list[_Group], ctx: _Context) -> list[_Group]:
    """Groups in dependency order, keeping file order where free (Kahn's algorithm)."""
    keys = {g.key: g for g in groups}
    deps = {g.key: _group_deps(g, ctx, keys) for g in groups}
    done: list[str] = []
    remaining = [g.key for g in groups]
    while remaining:
        ready = next((k for k in remaining if all(d in done for d in deps[k])), None)
        if ready is None:
            raise ParamsError(f"{keys[remaining[0]].source}: groups depend on each other in a cycle: "
                              f"{', '.join(remaining)}")
        done.append(ready)
        remaining.remove(ready)
    return [keys[k] for k in done]


# ---------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------
def _axes(group: _Group) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """[(axis, [(label, value or mapping)])] for a group's grid."""
    out = []
    for axis, values in (group.spec.get("grid") or {}).items():
        src = f"{group.source}.grid.{axis}"
        if isinstance(values, dict):  # a named axis: label -> mapping of keys
            if axis in FIELDS or _scale_field(axis):
                raise ParamsError(f"{src}: axis '{axis}' is a RunParams key: give a list of values, not a mapping")
            out.append((axis, [(label, mapping or {}) for label, mapping in values.items()]))
        else:
            if axis not in FIELDS and not _scale_field(axis):
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
    profile_src = _display(profile_file, project)
    flat, study = read_profile(profile_file)
    _check_keys(study, STUDY_KEYS, profile_src, "study")
    presets = study.get("presets") or {}
    if not isinstance(presets, dict):
        raise ParamsError(f"{profile_src}: study.presets must be a mapping of name -> keys")
    tasks = study.get("tasks") or {}
    for task in tasks:
        coerce_value("task", task, f"{profile_src}: study.tasks")
    ctx = _Context(presets, profile_src)
    profile_layers = ctx.layers(flat, profile_src)
    if any(layer.deps for layer in profile_layers):
        raise ParamsError(f"{profile_src}: a profile's top-level keys cannot depend on runs")

    groups = _order_groups(_load_groups(project, params_dir, notebooks_dir, study, profile_src), ctx)
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
            upstream = runs_by_group[_target_key(spec["group"], group.experiment)]
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
                    copied = _Layer(f"{source}.{key} (each)")
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
    def resolve(all_layers: list[_Layer], extra: dict[str, Any]) -> RunParams:
        scales = {k: (v, layer.source) for layer in all_layers for k, v in layer.scales.items()}
        params = resolve_params([(layer.source, layer.values) for layer in all_layers]
                                 + [("study", {"experiment": group.experiment, **extra})])
        return _apply_scales(params, scales)

    # The task decides which `study.tasks` keys apply: find it, then resolve for real.
    task = resolve(profile_layers + layers, {}).task
    stack = profile_layers + ctx.layers(tasks.get(task), f"{profile_src}: study.tasks.{task}") + layers
    provisional = resolve(stack, {})

    deps: dict[str, str] = {}
    bound: dict[str, str] = {}
    dep_specs = {k: (spec, layer.source) for layer in stack for k, spec in layer.deps.items()}
    for key, (spec, source) in dep_specs.items():
        target_key = _target_key(spec["group"], group.experiment)
        if "each" in spec:
            target = up
        else:
            candidates = runs_by_group[target_key]
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
                raise ParamsError(f"{source}: key '{key}': {problem} of group {target_key} with {want} "
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
