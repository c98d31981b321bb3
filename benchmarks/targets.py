"""The issue's speed and memory targets, checked against one benchmark report.

Each target is a ratio prefnb ÷ TRL (or prefnb's own MFU) with a bound. A target whose
measurements are missing is "not measured", never met.
"""

from __future__ import annotations

# (device kind, name, what is divided, baseline, bound, "min" or "max")
CPU_TARGETS = [
    ("dpo", "DPO steps/s ÷ TRL default", "steady_steps_per_second", "trl-default", 3.0, "min"),
    ("dpo", "DPO time to first step ÷ TRL default", "first_step_seconds", "trl-default", 1 / 3, "max"),
    ("sft", "SFT time to first step ÷ TRL default", "first_step_seconds", "trl-default", 1 / 3, "max"),
]
GPU_TARGETS = [
    ("dpo", "DPO pairs/s ÷ TRL default", "pairs_per_second", "trl-default", 4.0, "min"),
    ("dpo", "DPO pairs/s ÷ TRL tuned", "pairs_per_second", "trl-tuned", 2.0, "min"),
    ("sft", "SFT tokens/s ÷ TRL default", "tokens_per_second", "trl-default", 3.0, "min"),
    ("dpo", "DPO peak memory ÷ TRL default", "peak_memory_bytes", "trl-default", 0.6, "max"),
    ("dpo", "DPO peak memory ÷ TRL tuned", "peak_memory_bytes", "trl-tuned", 0.6, "max"),
    ("sft", "SFT peak memory ÷ TRL default", "peak_memory_bytes", "trl-default", 0.6, "max"),
    ("sft", "SFT peak memory ÷ TRL tuned", "peak_memory_bytes", "trl-tuned", 0.6, "max"),
    ("dpo", "DPO MFU (prefnb)", "mfu", None, 0.35, "min"),
    ("sft", "SFT MFU (prefnb)", "mfu", None, 0.35, "min"),
]
SWEEP_BOUND = 6.0  # six TRL default runs ÷ prefnb's sweep, GPU
TASKS = ("paraphrase", "sonnets")


def find_measurement(report: dict, task: str, kind: str, framework: str) -> dict | None:
    return next((m for m in report.get("measurements", []) if (m["task"], m["kind"], m["framework"])
                 == (task, kind, framework)), None)


def find_floor(report: dict | None, task: str, kind: str) -> float | None:
    """The start-up floor's time to first step for this work (see benchmarks/README.md)."""
    return next((f["first_step_seconds"] for f in (report or {}).get("floors") or ()
                 if (f["task"], f["kind"]) == (task, kind)), None)


def _status(value, bound: float, sense: str) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= bound if sense == "min" else value <= bound) else "missed"


def evaluate(report: dict | None, device_kind: str | None = None) -> list[dict]:
    """Every target of the report's device kind (or of ``device_kind`` with no report):
    name, value, bound, sense ('min' = at least, 'max' = at most), status; start-up targets
    also carry ``floor``, the start-up floor ÷ the same baseline (no trainer can go lower)."""
    kind_of_device = device_kind or report["device"]["kind"]
    table = CPU_TARGETS if kind_of_device == "cpu" else GPU_TARGETS
    out = []
    for kind, name, field, baseline, bound, sense in table:
        for task in TASKS:
            value = None
            ours = find_measurement(report, task, kind, "prefnb") if report else None
            theirs = find_measurement(report, task, kind, baseline) if (report and baseline) else None
            if ours and baseline is None:
                value = ours.get(field)
            elif ours and theirs and ours.get(field) is not None and theirs.get(field):
                value = ours[field] / theirs[field]
            entry = {"target": f"{name} ({task})", "value": value, "bound": bound, "sense": sense,
                     "status": _status(value, bound, sense)}
            floor = find_floor(report, task, kind) if field == "first_step_seconds" else None
            if floor is not None and theirs:  # the best ratio any transformers-based trainer could reach
                entry["floor"] = floor / theirs[field]
            out.append(entry)
    if kind_of_device == "gpu":
        sweep = report.get("sweep") if report else None
        value = sweep["trl_default_seconds"] / sweep["prefnb_seconds"] if sweep else None
        task = sweep["task"] if sweep else "paraphrase"
        out.append({"target": f"6-β sweep: six TRL default runs ÷ prefnb ({task})", "value": value,
                    "bound": SWEEP_BOUND, "sense": "min", "status": _status(value, SWEEP_BOUND, "min")})
    return out
