"""How each family of objectives is trained: the one interface `prefnb.train`'s loop calls.

    rows(task) -> n              encode its training rows (sampling rejections first where needed)
    prepare(micro_batches)       once before the loop: the reference log-probs of every micro-batch
    batch(m, indices)            micro-batch ``m`` (example ``indices``), collated, on the device
    step(model, batch)           -> (loss, {metric name: device scalar})
    drops_dropout                the policy loses its dropout (a preference loss compares it with its
                                 reference, equal at step 0 only without dropout)

The family of an objective is its row's in `prefnb.objectives.OBJECTIVES` (README, "Adding an objective").
"""

from __future__ import annotations

import torch

from prefnb import data as data_lib
from prefnb import losses, objectives
from prefnb.logprobs import collate, collate_pairs, response_token_logps, sequence_logps, to_device
from prefnb.precompute import batch_encodings, batch_reference_logps, sampled_rejections
from prefnb.session import RunContext


def sft_step(model, batch, params):
    """Token-mean f-divergence SFT loss over the response tokens of the batch."""
    token_logps, _ = response_token_logps(model, batch)
    loss = losses.token_loss(params.sft_loss, token_logps).mean()
    return loss, {"loss": loss.detach(), "mean_token_logp": token_logps.detach().mean()}


def preference_step(model, batch, params, ref_chosen, ref_rejected, mismatched=None):
    """Chosen and rejected in one forward: [chosen; rejected] rows, or one row per pair with
    the prompt shared (`prefnb.logprobs.collate_pairs`).

    ``mismatched`` (KTO): the batch's prompts paired with the previous pair's responses
    (`prefnb.precompute.batch_encodings`), with their ``reference_logps`` [2, B]; their
    policy log-probs, without gradient, give KTO's reference point z₀
    (`losses.kto_reference_point`), estimated on each process's own micro-batch.
    """
    logps, lengths = sequence_logps(model, batch)
    (pc, pr), (lc, lr) = logps.chunk(2), lengths.chunk(2)
    options = params.loss_options()
    if mismatched is not None:
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, mismatched)
        options["kl"] = losses.kto_reference_point(kl_logps, mismatched["reference_logps"].reshape(-1))
    per_pair, chosen_rewards, rejected_rewards = losses.preference_loss(
        params.objective, pc, pr, ref_chosen, ref_rejected, beta=params.beta,
        chosen_lengths=lc, rejected_lengths=lr, **options)
    loss = per_pair.mean()
    return loss, {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }


class SFT:
    """Supervised fine-tuning on prompt/completion rows (preference data: the chosen response)."""

    drops_dropout = False

    def __init__(self, run: RunContext):
        self.run = run

    def rows(self, task) -> int:
        self.encoded = [self.run.encoders.one(r["prompt"], r["completion"]) for r in task.train_sft]
        return len(self.encoded)

    def prepare(self, micro_batches: list[list[int]]) -> None:
        """Nothing: SFT needs no reference."""

    def batch(self, m: int, indices: list[int]) -> dict:
        return collate([self.encoded[i] for i in indices], self.run.tokenizer.pad_token_id, self.run.device)

    def step(self, model, batch):
        return sft_step(model, batch, self.run.params)


class Preference:
    """Every loss of `prefnb.losses.preference_loss` on prompt/chosen/rejected pairs; on sonnets,
    rejected continuations sampled from the starting policy (on-policy)."""

    drops_dropout = True

    def __init__(self, run: RunContext):
        self.run = run
        self.kto_mismatched = run.params.objective == "kto" and run.params.kto_reference_point == "mismatched"

    def rows(self, task) -> int:
        run, pairs = self.run, task.train_pairs
        if pairs is None and task.task not in data_lib.SAMPLED_REJECTIONS:
            raise data_lib.DataError(f"objective '{run.params.objective}' needs preference data: "
                                     f"{run.params.data_path} has prompt/completion rows; give prompt/chosen/rejected "
                                     "rows or use objective 'sft'")
        if pairs is None:  # rejected = samples of the starting policy
            with run.accelerator.main_process_first():
                pairs = data_lib.sonnet_sampled_pairs(task.train_sft, sampled_rejections(run, task.train_sft))
        self.pairs = pairs
        self.chosen, self.rejected = run.encoders.pairs(pairs)
        return len(pairs)

    def prepare(self, micro_batches: list[list[int]]) -> None:
        """The reference log-probs of every training micro-batch, scored once (cached on disk);
        zeros for a loss that ignores them, with no reference forward at all."""
        run = self.run
        if objectives.OBJECTIVES[run.params.objective].reference_free:
            zeros = torch.zeros(len(micro_batches), run.params.batch_size)
            self.reference = {"chosen": zeros, "rejected": zeros}
            return
        with run.accelerator.main_process_first():
            self.reference = batch_reference_logps(run, self.pairs, micro_batches, with_mismatched=self.kto_mismatched)

    def batch(self, m: int, indices: list[int]) -> dict:
        run = self.run
        pad, hidden = run.tokenizer.pad_token_id, run.hidden_size
        batch = collate_pairs([self.chosen[i] for i in indices], [self.rejected[i] for i in indices], pad,
                              hidden_size=hidden)
        # The batch's reference log-probs travel with it from the host (indexing a GPU tensor
        # with host indices would copy them over synchronously).
        batch["reference_logps"] = torch.stack([self.reference["chosen"][m], self.reference["rejected"][m]])  # [2, B]
        batch = to_device(batch, run.device)
        if self.kto_mismatched:
            mismatched = collate_pairs(*batch_encodings(run.encoders, self.pairs, indices, kl=True), pad,
                                       hidden_size=hidden)
            mismatched["reference_logps"] = torch.stack([self.reference["kl_chosen"][m],
                                                         self.reference["kl_rejected"][m]])
            batch["mismatched"] = to_device(mismatched, run.device)
        return batch

    def step(self, model, batch):
        return preference_step(model, batch, self.run.params, *batch["reference_logps"],
                               mismatched=batch.get("mismatched"))


FAMILIES = {"sft": SFT, "preference": Preference}


def plugin_for(run: RunContext):
    """The plug-in that trains ``run.params.objective``."""
    return FAMILIES[objectives.OBJECTIVES[run.params.objective].family](run)
