"""`python -m benchmarks`: prefnb and TRL side by side on identical work, as ratios.

Each measurement runs in a fresh process (see `benchmarks/worker.py`). Reported per
framework: DPO pairs/s, SFT non-pad tokens/s, steps/s, MFU, peak memory, time to first
step (from process spawn: interpreter, imports, data, model, reference log-probs), and
the end-to-end time of a 6-value β sweep. A start-up floor (imports, model, data and one
plain step, no trainer) puts the times to first step in proportion. Throughput is
steady-state: the first `prefnb.timing.timing_warmup_steps(steps)` steps are left out for
every framework.

Results go to `benchmarks/results/<device>.json`; `benchmarks/RESULTS.md` is rebuilt from
every device's latest JSON (targets evaluated then), so it never holds a number typed by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import targets as targets_lib
from benchmarks.work import (GPU_PEAK_BF16, MODELS, Work, model_config, model_dir, sequence_lengths, stream_rows,
                             training_flops)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
BETAS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel")


class BenchmarkError(RuntimeError):
    """A measurement failed; the message holds the worker's last lines."""


# ---------------------------------------------------------------------------------------
# running one measurement
# ---------------------------------------------------------------------------------------
def measure(framework: str, work: Work, *, betas: tuple[float, ...] = (0.1,), cache_dir: Path | None = None) -> dict:
    """Run one worker process and return its JSON result (several β: prefnb's in-process sweep)."""
    with tempfile.TemporaryDirectory(prefix="prefnb-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", framework, work.to_json(), str(out),
               "--spawned-at", repr(time.time()), "--beta", *map(repr, betas)]
        if cache_dir is not None:
            cmd += ["--cache-dir", str(cache_dir)]
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise BenchmarkError(f"{framework} on {work.task}/{work.kind} (β={', '.join(map(str, betas))}) failed "
                                 f"(exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def describe_work(work: Work, peak_flops: float | None) -> dict:
    """What the frameworks do per step, computed once from the data (not timed)."""
    rows = stream_rows(work)
    lengths = sequence_lengths(work, rows)
    config = model_config(work)
    from prefnb.timing import timing_warmup_steps

    steady = lengths[timing_warmup_steps(work.steps):]  # the steps both frameworks are timed over
    return {
        "work": asdict(work),
        "sequences_per_step": len(lengths[0]),
        "mean_sequence_tokens": sum(map(sum, lengths)) / sum(map(len, lengths)),
        "max_sequence_tokens": max(map(max, lengths)),
        "steady_tokens_per_step": sum(map(sum, steady)) / len(steady),
        "steady_flops_per_step": sum(training_flops(config, step) for step in steady) / len(steady),
        "peak_flops": peak_flops,
    }


TIMED = ("steady_steps_per_second", "first_step_seconds", "peak_memory_bytes")


def median_result(results: list[dict]) -> dict:
    """The median of each timed quantity over repeated measurements (the rest from the
    first), with every sample kept under ``samples``."""
    import statistics

    out = dict(results[0])
    for key in TIMED:
        out[key] = statistics.median(r[key] for r in results)
    out["samples"] = {key: [r[key] for r in results] for key in TIMED}
    return out


def derive(result: dict, described: dict) -> dict:
    """Throughputs from steady steps/s and the known work per step."""
    steps_per_s = result["steady_steps_per_second"]
    work = described["work"]
    out = dict(result)
    out["pairs_per_second"] = steps_per_s * work["batch_size"] if work["kind"] == "dpo" else None
    out["tokens_per_second"] = steps_per_s * described["steady_tokens_per_step"]
    peak = described["peak_flops"]
    out["mfu"] = steps_per_s * described["steady_flops_per_step"] / peak if peak else None
    return out


# ---------------------------------------------------------------------------------------
# the device
# ---------------------------------------------------------------------------------------
def device_info(device: str) -> dict:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if name.startswith(k)), None)
        return {"kind": "gpu", "name": name, "peak_flops": peak,
                "peak_flops_source": "vendor dense bf16 peak" if peak else "unknown device: MFU not reported"}
    return {"kind": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "peak_flops": measured_matmul_flops(),
            "peak_flops_source": "measured fp32 matmul rate (1024×1024), not a datasheet peak"}


def measured_matmul_flops(size: int = 1024, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - started)


def versions() -> dict:
    from prefnb.manifest import code_version, package_versions

    return {"prefnb": code_version(), "python": platform.python_version(), **package_versions(PACKAGES)}


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------
def resolve_device(choice: str) -> str:
    import torch

    device = "cuda" if choice == "auto" and torch.cuda.is_available() else ("cpu" if choice == "auto" else choice)
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is visible")
    return device


# What `python -m benchmarks` measures by default: on a GPU both real-size architectures, GPT-2
# (learned positions, MHA, GELU MLP) and Llama-style SmolLM2 (RoPE, grouped-query attention,
# SwiGLU); on a CPU the tiny model, which is all a 2-core machine times in minutes.
DEFAULT_MODELS = {"cuda": ("gpt2-124m", "smollm2-135m"), "cpu": ("tiny",)}


def run(args, model: str) -> dict:
    device = resolve_device(args.device)
    gpu = device == "cuda"
    steps = args.steps or (60 if gpu else 30)
    batch = args.batch_size or (32 if gpu else 8)
    precision = "bf16" if gpu else "fp32"
    info = device_info(device)
    print(f"device: {info['name']} ({device}); model {model}; batch {batch}; {steps} steps; {precision}", flush=True)
    model_dir(model)  # built once, before anything is timed

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": info,
              "versions": versions(), "settings": {"model": model, "steps": steps, "batch_size": batch,
                                                    "precision": precision, "betas": list(BETAS),
                                                    "repeats": args.repeats},
              "work": [], "measurements": [], "floors": [], "precision_checks": [], "sweep": None}
    for task in args.tasks:
        for kind in args.kinds:
            work = Work(model=model, task=task, kind=kind, batch_size=batch, steps=steps, precision=precision)
            described = describe_work(work, info["peak_flops"])
            report["work"].append(described)
            # Rounds of every framework in turn: a slow minute of a shared machine then hits all
            # of them alike, and each round's ratio compares neighbours in time.
            samples: dict[str, list[dict]] = {framework: [] for framework in args.frameworks}
            for _ in range(args.repeats):
                for framework in args.frameworks:
                    print(f"  {task:<10} {kind:<3} {framework:<11} ", end="", flush=True)
                    result = measure(framework, work)
                    samples[framework].append(result)
                    print(f"{result['steady_steps_per_second']:8.2f} steps/s  first step "
                          f"{result['first_step_seconds']:6.1f} s  peak {result['peak_memory_bytes'] / 2**20:7.0f} MiB",
                          flush=True)
            for framework, results in samples.items():
                report["measurements"].append({"task": task, "kind": kind, "framework": framework,
                                               **derive(median_result(results), described)})
            if precision == "bf16" and "prefnb" in args.frameworks:  # bf16 must train like fp32
                bf16 = targets_lib.find_measurement(report, task, kind, "prefnb")
                report["precision_checks"].append(precision_check(work, bf16))
            floor = measure("floor", work)["first_step_seconds"]
            report["floors"].append({"task": task, "kind": kind, "first_step_seconds": floor})
            print(f"  {task:<10} {kind:<3} {'floor':<11} {'':>15}  first step {floor:6.1f} s", flush=True)
    if args.sweep and "dpo" in args.kinds:
        report["sweep"] = run_sweep(Work(model=model, task=args.tasks[0], kind="dpo", batch_size=batch, steps=steps,
                                         precision=precision), concurrency=args.sweep_concurrency)
    return report


def precision_check(work: Work, bf16: dict) -> dict:
    """prefnb's loss curve in fp32 next to its bf16 one (``bf16``: that measurement)."""
    from dataclasses import replace

    fp32 = measure("prefnb", replace(work, precision="fp32"))["losses"]
    worst = max(abs(bf16["losses"][step] - loss) / abs(loss) for step, loss in fp32.items())
    print(f"  {work.task:<10} {work.kind:<3} bf16 vs fp32: largest relative loss difference {worst:.4f}", flush=True)
    return {"task": work.task, "kind": work.kind, "fp32_losses": fp32, "bf16_losses": bf16["losses"],
            "max_relative_difference": worst}


def run_sweep(work: Work, *, concurrency: int) -> dict:
    """Six β values end to end: prefnb's in-process sweep (``prefnb train --sweep``; with
    ``concurrency`` K, K such processes share the device, each taking every K-th β, all
    sharing one reference cache) vs six TRL default runs, one process each."""
    from concurrent.futures import ThreadPoolExecutor

    out = {"task": work.task, "betas": list(BETAS), "concurrency": concurrency}
    shares = [BETAS[k::concurrency] for k in range(concurrency) if BETAS[k::concurrency]]
    with tempfile.TemporaryDirectory(prefix="prefnb-sweep-cache-") as cache:
        started = time.time()
        with ThreadPoolExecutor(max_workers=len(shares)) as pool:
            results = list(pool.map(lambda share: measure("prefnb", work, betas=share, cache_dir=Path(cache)), shares))
        out["prefnb_seconds"] = time.time() - started
        out["prefnb_run_seconds"] = [s for r in results for s in r["run_seconds"]]
        out["prefnb_reference_seconds"] = [s for r in results for s in r["reference_seconds_per_run"]]
    print(f"  β sweep    prefnb      {out['prefnb_seconds']:8.1f} s for 6 runs", flush=True)
    started = time.time()
    for beta in BETAS:
        measure("trl-default", work, betas=(beta,))
    out["trl_default_seconds"] = time.time() - started
    print(f"  β sweep    trl-default {out['trl_default_seconds']:8.1f} s for 6 runs", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", nargs="+", choices=MODELS, default=None,
                        help="one report each (default: gpt2-124m and smollm2-135m on CUDA, tiny on CPU)")
    parser.add_argument("--tasks", nargs="+", choices=("paraphrase", "sonnets"), default=["paraphrase", "sonnets"])
    parser.add_argument("--kinds", nargs="+", choices=("dpo", "sft"), default=["dpo", "sft"])
    parser.add_argument("--frameworks", nargs="+", choices=("prefnb", "trl-default", "trl-tuned"),
                        default=["prefnb", "trl-default", "trl-tuned"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 60 GPU, 30 CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs or examples per step (default: 32 GPU, 8 CPU)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every framework in turn; medians are reported, with each round's ratio "
                             "(default 1)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the 6-value β sweep")
    parser.add_argument("--sweep-concurrency", type=int, default=1,
                        help="prefnb sweep processes sharing the device, each an in-process sweep over its "
                             "share of the β values (default 1: all six in one process)")
    parser.add_argument("--no-save", dest="save", action="store_false",
                        help="print only: leave benchmarks/results and RESULTS.md untouched")
    args = parser.parse_args(argv)
    if args.sweep_concurrency < 1 or args.repeats < 1:
        parser.error("--sweep-concurrency and --repeats must be at least 1")
    logging.getLogger("prefnb.data").setLevel(logging.ERROR)  # the data's known malformed rows, once per work
    from benchmarks import markdown

    try:
        device = resolve_device(args.device)
        for model in args.model or DEFAULT_MODELS[device]:
            report = run(args, model)
            print("\n" + markdown.report_markdown(report) + "\n")
            if args.save and set(args.frameworks) == {"prefnb", "trl-default", "trl-tuned"}:
                RESULTS_DIR.mkdir(exist_ok=True)
                name = markdown.results_file(report["device"]["kind"], model)
                (RESULTS_DIR / name).write_text(json.dumps(report, indent=2) + "\n")
                (HERE / "RESULTS.md").write_text(markdown.results_page(RESULTS_DIR))
                print(f"saved: benchmarks/results/{name}; benchmarks/RESULTS.md rebuilt")
    except BenchmarkError as err:
        print(f"\nbenchmark failed: {err}", file=sys.stderr)
        return 1
    return 0
