"""The study's params files, read and validated into run groups (expanded by :mod:`prefnb.grid`).

Pure: reads YAML, loads no model, touches no outputs.

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

Training-set size (a group whose runs vary ``train_size``): ``train_size_design`` says what
is held fixed as the training set shrinks.
- ``fixed_steps`` (the default): every run takes ``max_steps`` steps, so a smaller set is
  seen for more epochs (size and epochs are confounded);
- ``fixed_epochs``: ``max_steps`` is the budget of the group's largest ``train_size``; a run
  with fraction f of it takes ``max_steps · f / f_max`` steps (at least 1), and the other
  step-counted keys (``warmup_steps``, ``eval_every``, ``save_every``) shrink with it, so every
  size is seen for the same number of epochs. The design is recorded as the run label
  ``train_size_design``, which the paper quotes.

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
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from prefnb.config import FIELDS, ParamsError, RunParams, coerce_value, read_yaml_mapping

DEPENDENCY_KEYS = ("init_from", "reference")
EXPERIMENT_KEYS = {"notebook", "description", "groups"}
GROUP_KEYS = {"notebook", "description", "base", "grid", "train_size_design"}
OVERRIDE_KEYS = GROUP_KEYS | {"extends", "skip"}
STUDY_KEYS = {"presets", "tasks", "grid", "experiments", "description", "jobs"}
DEP_SPEC_KEYS = {"group", "match", "where", "each"}


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


def display_path(path: Path, project: Path) -> str:
    try:
        return str(path.resolve().relative_to(project.resolve()))
    except ValueError:
        return str(path)


def check_keys(mapping: Any, allowed: set[str], source: str, what: str) -> dict:
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
def scale_field(key: str) -> str | None:
    """'learning_rate_scale' -> 'learning_rate' when that is a numeric RunParams key."""
    if key.endswith("_scale") and key[: -len("_scale")] in FIELDS:
        name = key[: -len("_scale")]
        if typing.get_type_hints(RunParams)[name] in (int, float):
            return name
    return None


def _is_dependency(value: Any) -> bool:
    return isinstance(value, dict) and "group" in value


@dataclass
class Layer:
    """Keys from one place: plain values, scales, dependency specs."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    deps: dict[str, dict] = field(default_factory=dict)


class Context:
    def __init__(self, presets: Mapping[str, Any], presets_source: str):
        self.presets = presets
        self.presets_source = presets_source

    def layers(self, mapping: Any, source: str, *, allow_each: bool = False, _seen: tuple = ()) -> list[Layer]:
        """A mapping of keys → layers (its presets first, then its own keys)."""
        if mapping is None:
            return []
        if not isinstance(mapping, dict):
            raise ParamsError(f"{source}: must be a mapping of RunParams keys, got {mapping!r}")
        out: list[Layer] = []
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
        own = Layer(source)
        for key, value in mapping.items():
            if key == "use":
                continue
            if key == "experiment":
                raise ParamsError(f"{source}: key 'experiment' is set by the study (the experiment file's name)")
            if _is_dependency(value):
                if key not in DEPENDENCY_KEYS:
                    raise ParamsError(f"{source}: key '{key}' cannot depend on a run (only {', '.join(DEPENDENCY_KEYS)})")
                check_keys(value, DEP_SPEC_KEYS, source, f"the dependency of '{key}'")
                if "each" in value and not allow_each:
                    raise ParamsError(f"{source}: key '{key}': 'each' is allowed only in a group's base")
                if "each" in value and ("match" in value or "where" in value):
                    raise ParamsError(f"{source}: key '{key}': use either 'each' or 'match'/'where', not both")
                own.deps[key] = value
            elif scale_field(str(key)):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ParamsError(f"{source}: key '{key}' must be a number > 0, got {value!r}")
                own.scales[key] = float(value)
            else:
                coerce_value(str(key), value, source)  # fail early, naming the file
                own.values[key] = value
        return out + [own]


def apply_scales(params: RunParams, scales: Mapping[str, tuple[float, str]]) -> RunParams:
    changes = {}
    for key, (scale, source) in scales.items():
        name = scale_field(key)
        value = getattr(params, name) * scale
        if isinstance(getattr(params, name), int):
            value = max(1, int(round(value)))
        changes[name] = coerce_value(name, value, f"{source} ({key})")
    return replace(params, **changes) if changes else params


# ---------------------------------------------------------------------------------------
# groups: the file's, with the profile's overrides
# ---------------------------------------------------------------------------------------
TRAIN_SIZE_DESIGNS = ("fixed_steps", "fixed_epochs")
STEP_KEYS = ("max_steps", "warmup_steps", "eval_every", "save_every")  # counted in optimizer steps


def fixed_epochs(params: RunParams, largest_train_size: float, source: str) -> RunParams:
    """The run's step-counted keys scaled by train_size / largest_train_size (``fixed_epochs``):
    as many epochs as the largest size gets from ``max_steps``. At least 1 step; 0 (off) stays 0."""
    fraction = params.train_size / largest_train_size
    changes = {key: max(1, round(getattr(params, key) * fraction)) for key in STEP_KEYS if getattr(params, key)}
    return replace(params, **{k: coerce_value(k, v, f"{source} (train_size_design: fixed_epochs)")
                              for k, v in changes.items()})


def train_size_design(spec: dict, source: str) -> str:
    design = spec.get("train_size_design", "fixed_steps")
    if design not in TRAIN_SIZE_DESIGNS:
        raise ParamsError(f"{source}: key 'train_size_design' must be one of {', '.join(TRAIN_SIZE_DESIGNS)}, "
                          f"got {design!r}")
    return design


@dataclass
class Group:
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
    if "train_size_design" in override:
        spec["train_size_design"] = override["train_size_design"]
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


def load_groups(project: Path, params_dir: Path, notebooks_dir: Path, study: dict, profile_src: str) -> list[Group]:
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
    groups: list[Group] = []
    for exp, path in files.items():
        src = display_path(path, project)
        data = check_keys(read_yaml_mapping(path), EXPERIMENT_KEYS, src, "an experiment file")
        if "notebook" not in data:
            raise ParamsError(f"{src}: missing key 'notebook' (the notebook in {display_path(notebooks_dir, project)}/ it runs)")
        specs = data.get("groups")
        if not isinstance(specs, dict) or not specs:
            raise ParamsError(f"{src}: key 'groups' must be a mapping of one or more run groups")
        specs = {name: check_keys(spec, GROUP_KEYS, f"{src}: groups.{name}", "a group") for name, spec in specs.items()}
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
            over = check_keys(over, OVERRIDE_KEYS, osrc, "a group override")
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
                groups.append(Group(exp, name, spec, f"{src}: groups.{name}", notebook))
    return groups


def _group_deps(group: Group, ctx: Context, keys: dict[str, Group]) -> list[str]:
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
        target = target_key(spec["group"], group.experiment)
        if target not in keys:
            raise ParamsError(f"{source}: depends on group '{spec['group']}', which is not in the study "
                              f"(groups: {', '.join(keys)})")
        out.append(target)
    return out


def target_key(name: str, experiment: str) -> str:
    return name if "/" in name else f"{experiment}/{name}"


def order_groups(groups: list[Group], ctx: Context) -> list[Group]:
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
