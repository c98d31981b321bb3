"""What runs once before training, computed once and cached: each example's tokens
(`Encoders`), the reference log-probs, and on-policy rejected samples.

Cached on disk by what they depend on, not by run (contract 6 of DESIGN.md), so a β sweep or
the seven variants compute them once; tokens are kept per process, so the runs of an
in-process sweep (`prefnb train --sweep`) tokenise each example once between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefnb import data as data_lib
from prefnb import evaluate, models
from prefnb.cache import cache_key, cached
from prefnb.config import RunParams
from prefnb.logprobs import Encoded, encode, score_pairs, start_token_id

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
    # models.tokenizer_fingerprint, computed once: it hashes the whole vocabulary (~0.2 s for
    # GPT-2's) and every reference cache key needs it.
    fingerprint: str | None = None
    # Each (prompt, response) is tokenised once per run, though references, training and
    # evaluation all ask for it (slow tokenizers make this seconds of start-up).
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.fingerprint is None:
            self.fingerprint = models.tokenizer_fingerprint(self.tokenizer)

    def one(self, prompt: str, response: str, *, prior: bool = False) -> Encoded:
        key = (prompt, response, prior)
        if key not in self._memo:
            prompt_ids = [start_token_id(self.tokenizer)] if prior else None
            self._memo[key] = encode(self.tokenizer, prompt, response, max_length=self.max_length,
                                     add_eos=self.add_eos, prompt_ids=prompt_ids)
        return self._memo[key]

    def pairs(self, rows, *, prior: bool = False) -> tuple[list[Encoded], list[Encoded]]:
        return ([self.one(r["prompt"], r["chosen"], prior=prior) for r in rows],
                [self.one(r["prompt"], r["rejected"], prior=prior) for r in rows])

    @classmethod
    def shared(cls, tokenizer, max_length: int, add_eos: bool) -> "Encoders":
        """The process's Encoders for these settings, so that the runs of an in-process sweep
        (`prefnb train --sweep`) tokenise each example once between them. Tokenizers with
        the same class, vocabulary and special tokens give the same ids (the reference cache
        relies on the same fingerprint)."""
        fingerprint = models.tokenizer_fingerprint(tokenizer)
        key = (type(tokenizer).__name__, fingerprint, max_length, add_eos)
        if key not in _SHARED_ENCODERS:
            if len(_SHARED_ENCODERS) >= 4:  # a few settings at a time; the oldest goes
                _SHARED_ENCODERS.pop(next(iter(_SHARED_ENCODERS)))
            _SHARED_ENCODERS[key] = cls(tokenizer, max_length, add_eos, fingerprint)
        return _SHARED_ENCODERS[key]


_SHARED_ENCODERS: dict[tuple, Encoders] = {}


def reference_logps(params: RunParams, start_model, tokenizer, encoders: Encoders, rows, *, split: str,
                    cache_dir: Path, start_identity: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """log π_ref(chosen), log π_ref(rejected) for every pair in ``rows``: [N] each, on CPU.

    reference = policy: the starting policy; none: zeros (probability reward); prior: the
    starting policy scoring the response after a lone start token, i.e. log p(y); anything
    else: that model (tokenizer checked).
    """
    kind = params.reference
    if kind == "none" or not rows:
        zeros = torch.zeros(len(rows))
        return zeros, zeros.clone()
    separate = kind not in ("policy", "prior")
    identity = models.weights_identity(kind, params.seed) if separate else start_identity
    key = cache_key(reference=identity, prior=kind == "prior", data=data_lib.dataset_hash(rows),
                    tokenizer=encoders.fingerprint, max_length=params.max_length,
                    add_eos=encoders.add_eos)

    def compute():
        ref_model = models.load_reference_model(kind, tokenizer, params.seed).to(device) if separate else start_model
        chosen, rejected = encoders.pairs(rows, prior=kind == "prior")
        scores = score_pairs(ref_model, chosen, rejected, pad_id=tokenizer.pad_token_id,
                             batch_size=params.eval_batch_size, device=device)
        return {"chosen": scores[0], "rejected": scores[1]}

    value, hit = cached(cache_dir, "reference_logps", key, compute)
    log.info("reference log-probs (%s, %s split, %d pairs): %s", kind, split, len(rows), "cache hit" if hit else "computed")
    return value["chosen"], value["rejected"]


def sampled_rejections(params: RunParams, start_model, tokenizer, rows, *, cache_dir: Path, start_identity: str,
                       device) -> list[str]:
    """On-policy rejected continuations: top-p samples of the starting (reference/SFT) model."""
    key = cache_key(model=start_identity, prompts=data_lib.dataset_hash([r["prompt"] for r in rows]),
                    max_new_tokens=params.max_new_tokens, top_p=params.top_p, temperature=params.temperature,
                    seed=params.seed, max_length=params.max_length)

    def compute():
        return evaluate.generate(start_model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=params.max_new_tokens,
                                 greedy=False, top_p=params.top_p, temperature=params.temperature, seed=params.seed,
                                 batch_size=params.eval_batch_size, max_length=params.max_length, device=device)

    value, hit = cached(cache_dir, "sampled_rejections", key, compute)
    log.info("sampled rejected continuations (%d): %s", len(rows), "cache hit" if hit else "generated")
    return value
