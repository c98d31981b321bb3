"""Markdown for a benchmark report, and `benchmarks/RESULTS.md` rebuilt from the saved JSON."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import targets as targets_lib

FRAMEWORK_ORDER = ("prefnb", "trl-default", "trl-tuned")
DEVICE_TITLES = {"gpu": "GPU", "cpu": "CPU"}


def _fmt(value, spec: str = ".2f", empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def measurements_table(report: dict) -> str:
    rows = []
    for m in report["measurements"]:
        losses = m.get("losses") or {}
        rows.append([m["task"], m["kind"], m["framework"], _fmt(m.get("pairs_per_second"), ".1f"),
                     _fmt(m.get("tokens_per_second"), ",.0f"), _fmt(m["steady_steps_per_second"]),
                     _fmt(100 * m["mfu"] if m.get("mfu") is not None else None, ".1f"),
                     _fmt(m["peak_memory_bytes"] / 2**20, ",.0f"), _fmt(m["first_step_seconds"], ".1f"),
                     " / ".join(f"{float(v):.4f}" for _, v in sorted(losses.items(), key=lambda kv: int(kv[0])))])
    return _table(["task", "objective", "framework", "pairs/s", "tokens/s", "steps/s", "MFU %", "peak MiB",
                   "first step (s)", "loss every 10 steps"], rows)


def ratios_table(report: dict) -> str:
    rows = []
    for task in targets_lib.TASKS:
        for kind in ("dpo", "sft"):
            ours = targets_lib.find_measurement(report, task, kind, "prefnb")
            for baseline in FRAMEWORK_ORDER[1:]:
                theirs = targets_lib.find_measurement(report, task, kind, baseline)
                if not (ours and theirs):
                    continue
                floor = targets_lib.find_floor(report, task, kind)
                rows.append([task, kind, baseline, _ratio(ours, theirs, "steady_steps_per_second"),
                             _ratio(ours, theirs, "peak_memory_bytes"), _ratio(ours, theirs, "first_step_seconds"),
                             "–" if floor is None else f"{floor / theirs['first_step_seconds']:.2f}×"])
    return _table(["task", "objective", "prefnb ÷", "throughput", "peak memory", "time to first step",
                   "start-up floor ÷ the same"], rows)


def _ratio(ours: dict, theirs: dict, key: str) -> str:
    """The ratio of the medians; over repeated rounds, also the lowest and highest ratio of
    one round (prefnb and the baseline measured minutes apart, on the same machine)."""
    text = f"{ours[key] / theirs[key]:.2f}×"
    a, b = (ours.get("samples") or {}).get(key, []), (theirs.get("samples") or {}).get(key, [])
    if len(a) > 1 and len(a) == len(b):
        rounds = [x / y for x, y in zip(a, b)]
        text += f" ({min(rounds):.2f}–{max(rounds):.2f})"
    return text


def targets_table(targets: list[dict]) -> str:
    rows = [[t["target"], _target_value(t), ("≥ " if t["sense"] == "min" else "≤ ") + f"{t['bound']:.2f}",
             t["status"], _floor_note(t)] for t in targets]
    return _table(["target", "measured", "required", "status", "note"], rows)


def _target_value(target: dict) -> str:
    """Two decimals, or three where two would round a miss onto the bound (2.996 → "2.996", not "3.00")."""
    value = target["value"]
    if value is None:
        return "not measured"
    return f"{value:.3f}" if round(value, 2) == round(target["bound"], 2) else f"{value:.2f}"


def _floor_note(target: dict) -> str:
    floor = target.get("floor")  # start-up targets only, all of them "at most"
    if floor is None:
        return ""
    return f"the start-up floor alone is {floor:.2f}: {'out of reach' if floor > target['bound'] else 'within reach'}"


def report_markdown(report: dict) -> str:
    s, d, v = report["settings"], report["device"], report["versions"]
    parts = [
        f"Measured {report['date']} on {d['name']} ({d['kind']}"
        + (f", {d['cores']} cores, {d['threads']} torch threads" if d["kind"] == "cpu" else "") + ").",
        f"Model `{s['model']}`, batch {s['batch_size']}, {s['steps']} steps per run, {s['precision']}"
        + (f"; {s['repeats']} rounds of every framework in turn, medians (per-round ratio range in brackets)"
           if s.get("repeats", 1) > 1 else "") + "; MFU peak: "
        f"{d['peak_flops_source']} ({_fmt(d['peak_flops'] / 1e12 if d['peak_flops'] else None, '.2f')} TFLOP/s).",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "", "**Measurements** (steady state: the first steps are left out; time to first step counts from process "
        "spawn, imports included):", "", measurements_table(report),
        "", "**prefnb ÷ TRL** (throughput above 1 and memory or start-up below 1 favour prefnb; the start-up "
        "floor is the time to first step of no trainer at all: the imports, model, data and one plain "
        "forward/backward/AdamW step, a bound no framework on transformers gets under):", "",
        ratios_table(report)]
    for check in report.get("precision_checks") or ():
        parts += ["", f"**bf16 against fp32** ({check['task']} {check['kind']}, prefnb, the same batches): the "
                  f"{len(check['fp32_losses'])} logged losses differ by at most "
                  f"{100 * check['max_relative_difference']:.2f} % (bf16 resolves 0.78 %, 2⁻⁷)."]
    sweep = report.get("sweep")
    if sweep:
        parts += ["", f"**6-value β sweep** ({sweep['task']}, β ∈ {{{', '.join(map(str, sweep['betas']))}}}, "
                  f"end to end): prefnb {sweep['prefnb_seconds']:.1f} s ({_sweep_layout(sweep['concurrency'])}, "
                  "one shared reference cache) vs six TRL default runs, one process each, "
                  f"{sweep['trl_default_seconds']:.1f} s: "
                  f"{sweep['trl_default_seconds'] / sweep['prefnb_seconds']:.2f}× faster."]
    parts += ["", "**Targets**:", "", targets_table(targets_lib.evaluate(report))]
    return "\n".join(parts)


def _sweep_layout(concurrency: int) -> str:
    if concurrency == 1:
        return "the six runs in one process, as `prefnb train --sweep` runs them"
    return f"{concurrency} such processes sharing the device, each running its share of the β values"


# The model each device kind's main results file (`<kind>.json`) holds; another model's
# report goes to `<kind>-<model>.json` beside it.
PRIMARY_MODEL = {"gpu": "gpt2-124m", "cpu": "tiny"}
EXPECTED_MODELS = {"gpu": ("gpt2-124m", "smollm2-135m"), "cpu": ("tiny",)}  # owed where never measured


def results_file(kind: str, model: str) -> str:
    return f"{kind}.json" if PRIMARY_MODEL[kind] == model else f"{kind}-{model}.json"


def results_page(results_dir: Path) -> str:
    """RESULTS.md: the latest report of each device kind and model; one never measured says so."""
    parts = ["# Benchmark results", "",
             "Generated by `python -m benchmarks` from `benchmarks/results/*.json`; do not edit by hand.",
             "What is measured and how: `benchmarks/README.md`. In short: every framework does the same",
             "batches in its own fresh process; throughput is steady state; time to first step counts from the",
             "process spawn (imports included); MFU credits every framework with the same model FLOPs, so",
             "prefnb's shared-prompt DPO rows make its MFU an effective one."]
    for kind in ("gpu", "cpu"):
        saved = sorted(p.stem.split("-", 1)[1] for p in Path(results_dir).glob(f"{kind}-*.json"))
        for model in dict.fromkeys([*EXPECTED_MODELS[kind], *saved]):
            path = Path(results_dir) / results_file(kind, model)
            parts += ["", f"## {DEVICE_TITLES[kind]}: `{model}`", ""]
            if path.is_file():
                parts.append(report_markdown(json.loads(path.read_text())))
            else:
                parts += [f"Not yet measured: no {DEVICE_TITLES[kind]} run of `{model}` has been saved. "
                          "Every target below is owed.", "", targets_table(targets_lib.evaluate(None, kind))]
    return "\n".join(parts) + "\n"
