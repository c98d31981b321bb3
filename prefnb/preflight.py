"""Checks that run before a run allocates anything: values the data or the machine cannot serve.

:func:`check` runs at the top of :func:`prefnb.train.train`, before accelerate, the models and
the run directory exist; each failure names the key, the value and what would work (the README's
"Train one run" lists the checks). Everything here is cheap: configs and tokenizers, no weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from prefnb.config import REFERENCE_KINDS, ParamsError, RunParams


class PreflightError(ParamsError):
    """A value the data or the machine cannot serve; one line naming the key."""


def check(params: RunParams, out_dir: Path, cache_dir: Path, session=None):
    """Raise PreflightError (or the loaders' DataError / ModelLoadError) before any work.
    Returns the run's task data (`prefnb.data.TaskData`), which the batch check had to load
    (with ``session``'s parsed files): the run uses it rather than loading it a second time."""
    check_writable(out_dir, "output_dir")
    check_writable(cache_dir, "cache_dir")
    check_precision(params)
    task = check_batch(params, session)
    check_model(params, session)
    return task


def check_writable(path: Path, key: str) -> None:
    """``path`` is (or can be made as) a folder we can write in: probe its nearest existing folder
    with a file (so that root and read-only mounts are caught too)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{key} '{path}': {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".prefnb-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PreflightError(f"{key} '{path}': cannot write in {existing} ({err.strerror or err}); choose a "
                             "writable folder") from None


def check_precision(params: RunParams) -> None:
    import torch

    if params.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PreflightError(f"precision 'bf16': {torch.cuda.get_device_name()} has no bfloat16 support; use "
                             "precision 'fp32' (or 'auto', which picks bf16 only where it is supported)")


def check_batch(params: RunParams, session=None):
    """The training split must fill one optimizer step without repeating an example in it.
    Returns the loaded task data."""
    from prefnb.data import load_task

    task = load_task(params, session)
    n_train = len(task.train_pairs if params.is_preference and task.train_pairs is not None else task.train_sft)
    per_step = params.batch_size * params.grad_accum_steps
    if n_train < per_step:
        raise PreflightError(f"batch_size {params.batch_size} x grad_accum_steps {params.grad_accum_steps} = "
                             f"{per_step} examples per step, but the {params.task} training split has {n_train} "
                             f"(train_size {params.train_size:g}, max_train_examples {params.max_train_examples}); "
                             "lower batch_size or use more data")
    return task


def _config(source: str, session=None):
    """The model config of a model name, hub id, model directory or run directory (None: unknown
    here, e.g. a hub id offline; the model loader then says what is wrong)."""
    from prefnb import models

    if source == models.TINY:
        return dict(models.TINY_CONFIG)
    if models.holds_checkpoint(source):
        ckpt = models.checkpoint_dir(source)
        record = json.loads((ckpt / models.CHECKPOINT_RECORD).read_text())
        if record["kind"] != "full":  # a LoRA adapter: the base's config
            return _config(record["base_init_from"] or record["base_model"], session)
        source = str(ckpt)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(models.pretrained_source(source, session)).to_dict()
    except (OSError, ValueError, models.ModelLoadError):
        return None


def _tokenizer(source: str):
    from prefnb import models

    if source == models.TINY:
        return models.tiny_tokenizer()
    try:
        from transformers import AutoTokenizer

        where = models.checkpoint_dir(source) if models.holds_checkpoint(source) else models.pretrained_source(source)
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, models.ModelLoadError):
        return None


def check_model(params: RunParams, session=None) -> None:
    from prefnb import models

    if params.init_from:
        models.checkpoint_dir(params.init_from)  # a clear error when it is not a finished run
    start = params.init_from or params.model
    config = _config(start, session) or {}
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    if positions is not None:
        if params.max_length > positions:
            raise PreflightError(f"max_length {params.max_length} exceeds the {positions} positions of model "
                                 f"'{start}'; set max_length <= {positions}")
        if params.task == "sonnets" and params.max_new_tokens >= positions:
            raise PreflightError(f"max_new_tokens {params.max_new_tokens} leaves no room for the prompt in the "
                                 f"{positions} positions of model '{start}'")
    if params.is_preference and params.reference not in REFERENCE_KINDS:
        policy_tok, ref_tok = _tokenizer(start), _tokenizer(params.reference)
        if policy_tok is not None and ref_tok is not None:
            models.check_same_tokenizer(policy_tok, ref_tok, params.reference)
