"""Prompt formats (README, ``prompt_format``): ``plain`` leaves a task's rows as they are;
``chat`` puts the prompt into the tokenizer's chat template as the user turn and the response
as the assistant turn, its leading whitespace dropped (the template starts the turn on a new
line); a response ending in EOS (sonnets) ends the turn as the template does (SmolLM2: ``<|im_end|>``).

Applied once to a run's :class:`~prefnb.data.TaskData`, so training, references, sampling,
evaluation and every cache key see the same text. Rows keep their plain prompt as ``plain_prompt``
(the whole-sonnet chrF scores plain text); paraphrase evaluation rows name their ``answers``.
"""

from __future__ import annotations

import dataclasses

from prefnb.data import ANSWERS

PROMPT_FORMATS = ("plain", "chat")
RESPONSE_KEYS = ("completion", "chosen", "rejected")


class PromptFormatError(ValueError):
    """The requested format cannot be served (e.g. chat with a tokenizer that has no template)."""


def chat_prompt(tokenizer, prompt: str) -> str:
    """The chat template around ``prompt`` as the user's turn, up to the assistant's turn opening."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def apply_prompt_format(task, tokenizer, prompt_format: str):
    """``task`` (TaskData) with every prompt and response in ``prompt_format``; plain: unchanged."""
    if prompt_format == "plain":
        return task
    if prompt_format not in PROMPT_FORMATS:
        raise PromptFormatError(f"prompt_format '{prompt_format}' is not one of {', '.join(PROMPT_FORMATS)}")
    if not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError(f"prompt_format 'chat': the tokenizer ({type(tokenizer).__name__}) has no chat "
                                "template; use prompt_format 'plain' for this model")

    def row(r):
        if not isinstance(r, dict) or "prompt" not in r:
            return r
        out = dict(r, prompt=chat_prompt(tokenizer, r["prompt"]), plain_prompt=r.get("plain_prompt", r["prompt"]))
        out.update({k: r[k].lstrip() for k in RESPONSE_KEYS if isinstance(r.get(k), str)})
        if "label" in r:  # paraphrase evaluation rows: the answers to score, as training sees them
            out["answers"] = [ANSWERS[True].lstrip(), ANSWERS[False].lstrip()]
        return out

    def rows(v: list):
        if v and isinstance(v[0], str):  # bare prompts (sonnet test prompts)
            return [chat_prompt(tokenizer, p) for p in v]
        return [row(r) for r in v]

    changes = {f.name: rows(getattr(task, f.name)) for f in dataclasses.fields(task)
               if isinstance(getattr(task, f.name), list)}
    return dataclasses.replace(task, **changes)
