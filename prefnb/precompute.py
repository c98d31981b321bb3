"""What runs once before training: each example's tokens (`Encoders`, kept per
`prefnb.session.Session`), the reference log-probs (of the held-out pairs, and of every training
batch exactly as the loop will score it) and on-policy rejected samples, cached on disk by what
they depend on (`prefnb.cache`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from prefnb import data as data_lib
from prefnb import evaluate, models
from prefnb.cache import cache_key, cached
from prefnb.logprobs import (Encoded, collate_pairs, encode, eval_mode, score_pairs, sequence_logps, start_token_id,
                             to_device)
from prefnb.session import RunContext, Session

log = logging.getLogger(__name__)

# Paraphrase answers are scored as bare continuations (" yes" vs " no"); free text ends with EOS
# so that generation learns to stop.
ADD_EOS = {"paraphrase": False, "sonnets": True, "jsonl": True}


@dataclass
class Encoders:
    """Tokenisation settings shared by training, references and evaluation."""

    tokenizer: object
    max_length: int
    add_eos: bool
    # models.tokenizer_identity, computed once: every reference cache key needs it.
    identity: str | None = None
    # Each (prompt, response) is tokenised once per run, though references, training and
    # evaluation all ask for it (slow tokenizers make this seconds of start-up).
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.identity is None:
            self.identity = models.tokenizer_identity(self.tokenizer)

    @functools.cached_property
    def newline_counts(self) -> torch.Tensor:
        """`evaluate.LineBudget.newline_counts_of`, once per tokenizer, not per sonnet evaluation."""
        return evaluate.LineBudget.newline_counts_of(self.tokenizer)

    def one(self, prompt: str, response: str, *, prior: bool = False, eos: bool = True) -> Encoded:
        """``eos=False``: no EOS after this response even where the task adds one (a sampled
        sonnet continuation the model did not finish, `prefnb.data.sonnet_sampled_pairs`)."""
        key = (prompt, response, prior, eos)
        if key not in self._memo:
            prompt_ids = [start_token_id(self.tokenizer)] if prior else None
            self._memo[key] = encode(self.tokenizer, prompt, response, max_length=self.max_length,
                                     add_eos=self.add_eos and eos, prompt_ids=prompt_ids)
        return self._memo[key]

    def pairs(self, rows, *, prior: bool = False) -> tuple[list[Encoded], list[Encoded]]:
        """Chosen and rejected encodings; a row's ``chosen_eos`` / ``rejected_eos`` (default
        true) say whether that response ends with EOS."""
        return batch_encodings(self, rows, list(range(len(rows))), prior=prior)

    @classmethod
    def of(cls, tokenizer, max_length: int, add_eos: bool, session: Session | None = None) -> "Encoders":
        """Encoders for these settings; a ``session``'s from an earlier run with the same tokenizer
        files (`models.tokenizer_identity`), so that the runs of an in-process sweep
        (`prefnb train --sweep`) tokenise each example once between them."""
        identity = models.tokenizer_identity(tokenizer)
        return (session or Session()).memo("encoders", (identity, max_length, add_eos),
                                           lambda: cls(tokenizer, max_length, add_eos, identity))


def _reference(run: RunContext, kind: str, seed: int, rows, **key_parts):
    """(cache key, a loader of the reference model) for reference ``kind`` scoring ``rows``."""
    if kind in ("policy", "prior"):
        identity, load = run.start_identity, lambda: run.start_model
    else:
        identity, load = (models.weights_identity(kind, seed, run.session),
                          lambda: models.load_reference_model(kind, run.tokenizer, seed, run.session).to(run.device))
    key = cache_key(reference=identity, prior=kind == "prior", data=data_lib.dataset_hash(rows),
                    tokenizer=run.encoders.identity, max_length=run.params.max_length,
                    add_eos=run.encoders.add_eos, **key_parts)
    return key, load


def reference_logps(run: RunContext, rows, *, split: str,
                    source: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(chosen), log π_ref(rejected) for every pair in ``rows``: [N] each, on CPU.

    For the held-out splits, scored (like the policy there) in full precision. reference =
    policy: the starting policy; none: zeros (probability reward); prior: the starting policy
    scoring the response after a lone start token, i.e. log p(y); anything else: that model.
    ``source`` = (model, seed) scores with that model instead of ``params.reference`` (the base
    model a chain of runs started from: `models.chain_base`).
    """
    kind, seed = source if source else (run.params.reference, run.params.seed)
    if kind == "none" or not rows:
        zeros = torch.zeros(len(rows))
        return zeros, zeros.clone()
    key, load = _reference(run, kind, seed, rows)

    def compute():
        scores = score_pairs(load(), *run.encoders.pairs(rows, prior=kind == "prior"),
                             pad_id=run.tokenizer.pad_token_id, batch_size=run.params.eval_batch_size,
                             device=run.device)
        return {"chosen": scores[0], "rejected": scores[1]}

    value, hit = cached(run.cache_dir, "reference_logps", key, compute)
    log.info("reference log-probs (%s, %s split, %d pairs): %s", kind, split, len(rows),
             "cache hit" if hit else "computed")
    return value["chosen"], value["rejected"]


def mismatched(batch: list[int]) -> list[int]:
    """For each position i of a micro-batch, the example whose responses x_i is paired with to
    estimate KTO's reference point (`losses.kto_reference_point`): the previous one, cyclically
    (y_{i−1}), as TRL's KTOTrainer rolls the batch's completions. With batch_size 1, x_1 keeps
    its own responses and z₀ becomes the matched estimate (as in TRL with a per-device batch of 1)."""
    return batch[-1:] + batch[:-1]


def batch_encodings(encoders: Encoders, rows, batch: list[int], *, prior: bool = False, kl: bool = False):
    """(chosen, rejected) encodings of one micro-batch of pair indices; ``kl``: the mismatched
    pairs (x_i, y_{i−1}) instead (:func:`mismatched`); ``prior``: the response after a start token."""
    responses = mismatched(batch) if kl else batch
    return tuple([encoders.one(rows[i]["prompt"], rows[j][side], prior=prior, eos=rows[j].get(side + "_eos", True))
                  for i, j in zip(batch, responses)] for side in ("chosen", "rejected"))


def batch_reference_logps(run: RunContext, rows, batches: list[list[int]], *, with_mismatched: bool
                          ) -> dict[str, torch.Tensor]:
    """The reference log-probs of every training micro-batch, scored exactly as the loop scores
    the policy: the same batches, row layout (``collate_pairs`` decides it per batch) and autocast
    context (the run's accelerator's). Rounding then matches bit for bit, so at step 0 (policy =
    reference) every log-ratio is 0 and the DPO loss is ln 2 whatever the precision; the held-out
    rows' reference (:func:`reference_logps`) would differ from a bf16 policy by batch-shape- and
    precision-dependent rounding. One no-grad forward per training pair per step, cached: the
    micro-batches are a pure function of the seed (``prefnb.schedule``), so every run with the
    same reference, data, batches and precision (a β sweep, the variants) shares it.

    Returns {"chosen", "rejected"}: [M, B] for M micro-batches of B pairs, on CPU; with
    ``with_mismatched`` (KTO's reference point) also "kl_chosen", "kl_rejected" [M, B], the
    reference log-probs of the mismatched pairs (:func:`batch_encodings` with kl=True).
    """
    kind, names = run.params.reference, ("chosen", "rejected", "kl_chosen", "kl_rejected")
    shape = (len(batches), len(batches[0]) if batches else 0)
    if kind == "none":
        zeros = torch.zeros(shape)
        return {name: zeros for name in names}
    key, load = _reference(run, kind, run.params.seed, rows, version=1, batches=data_lib.dataset_hash(batches),
                           hidden_size=run.hidden_size, mixed_precision=run.accelerator.mixed_precision,
                           device=run.device.type, with_mismatched=with_mismatched)

    @torch.no_grad()
    def compute():
        out = {name: torch.empty(shape) for name in names}
        with eval_mode(load()) as ref_model:
            for m, batch in enumerate(batches):
                for prefix, kl in (("", False), ("kl_", True)) if with_mismatched else (("", False),):
                    chosen, rejected = batch_encodings(run.encoders, rows, batch, prior=kind == "prior", kl=kl)
                    collated = to_device(collate_pairs(chosen, rejected, run.tokenizer.pad_token_id,
                                                       hidden_size=run.hidden_size), run.device)
                    with run.accelerator.autocast():
                        logps, _ = sequence_logps(ref_model, collated)
                    out[prefix + "chosen"][m], out[prefix + "rejected"][m] = logps.float().cpu().chunk(2)
        return out

    value, hit = cached(run.cache_dir, "batch_reference_logps", key, compute)
    log.info("reference log-probs (%s, %d training micro-batches): %s", kind, len(batches),
             "cache hit" if hit else "computed")
    return value


def sampled_rejections(run: RunContext, rows) -> list[tuple[str, bool]]:
    """On-policy rejected continuations: top-p samples of the starting (reference/SFT) model,
    each with whether the model emitted EOS (`prefnb.data.sonnet_sampled_pairs` trims them).

    They are training data, so they are drawn with ``data_seed`` (the seed that fixes the splits),
    not the run's ``seed``: every run from the same starting model shares one set, whatever its
    training seed, and the seeds of a study vary initialisation and data order only."""
    params, prompts = run.params, [r["prompt"] for r in rows]
    # version 3: sampled with data_seed (version 2 used the run's seed).
    key = cache_key(version=3, model=run.start_identity, prompts=data_lib.dataset_hash(prompts),
                    max_new_tokens=params.max_new_tokens, top_p=params.top_p, temperature=params.temperature,
                    data_seed=params.data_seed, max_length=params.max_length)

    def compute():
        return evaluate.generate_with_ends(
            run.start_model, run.tokenizer, prompts, max_new_tokens=params.max_new_tokens, greedy=False,
            top_p=params.top_p, temperature=params.temperature, seed=params.data_seed,
            batch_size=params.eval_batch_size, max_length=params.max_length, device=run.device)

    value, hit = cached(run.cache_dir, "sampled_rejections", key, compute)
    log.info("sampled rejected continuations (%d): %s", len(rows), "cache hit" if hit else "generated")
    return [(text, bool(ended)) for text, ended in value]
