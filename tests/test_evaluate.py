"""Task metrics against values computed by hand (not against the code that computes them).

Keys are looked up by their suffix, so these hold for either split prefix (eval/, test/).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from prefnb import evaluate


def _by_suffix(metrics: dict, suffix: str) -> float:
    [value] = [v for k, v in metrics.items() if k.endswith("/" + suffix)]
    return value


@pytest.mark.parametrize("predictions, labels, expected", [
    ([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], 2 * 2 / (2 * 2 + 1 + 1)),  # tp 2, fp 1, fn 1 -> 4/6
    ([1, 1, 1, 1], [1, 0, 0, 0], 2 / (2 + 3)),                    # tp 1, fp 3, fn 0 -> 2/5
    ([0, 0, 0], [1, 1, 0], 0.0),                                  # nothing predicted positive
    ([0, 0], [0, 0], 0.0),                                        # no positives at all: 0, not NaN
])
def test_binary_f1_by_hand(predictions, labels, expected):
    assert evaluate.binary_f1(predictions, labels) == pytest.approx(expected)


def _chrf(orders: list[tuple[int, int, int]]) -> float:
    """sacrebleu's chrF (β = 2, effective-order averaging) from per-order (hyp, ref, match) counts,
    written out from its definition [Popović 2015; sacrebleu 2.x `CHRF._compute_f_score`]."""
    counted = [(Fraction(m, h), Fraction(m, r)) for h, r, m in orders if h and r]
    p = sum(x for x, _ in counted) / len(counted)
    r = sum(y for _, y in counted) / len(counted)
    return float(100 * 5 * p * r / (4 * p + r)) if p + r else 0.0


def test_both_chrf_conventions_by_hand():
    """Corpus chrF of the continuation (first as many lines as the reference has) and of the
    whole sonnet (prompt + continuation vs the whole reference). Whitespace is not counted."""
    rows = [{"prompt": "ab\n", "reference": "cd\n", "full_reference": "ab\ncd\n"},
            {"prompt": "uv\n", "reference": "xyz\n", "full_reference": "uv\nxyz\n"}]
    generated = ["ce\nan extra line, not scored", "xyz"]
    metrics = evaluate.sonnet_metrics(generated, rows)
    # continuation: "ce" vs "cd" and "xyz" vs "xyz", character n-gram counts summed over the corpus:
    # order 1: hyp 2+3, ref 2+3, match 1+3; order 2: 1+2, 1+2, 0+2; order 3: 0+1, 0+1, 0+1.
    continuation = _chrf([(5, 5, 4), (3, 3, 2), (1, 1, 1)])
    assert continuation == pytest.approx(100 * Fraction(37, 45), abs=1e-9)  # (4/5 + 2/3 + 1) / 3
    assert _by_suffix(metrics, "chrf") == pytest.approx(continuation, abs=1e-6)
    # whole sonnet: "abce" vs "abcd" and "uvxyz" vs "uvxyz" (whitespace removed):
    # order 1: 4+5 hyp, 4+5 ref, 3+5 match; 2: 3+4, 3+4, 2+4; 3: 2+3, 2+3, 1+3; 4: 1+2, 1+2, 0+2; 5: 0+1, 0+1, 0+1.
    whole = _chrf([(9, 9, 8), (7, 7, 6), (5, 5, 4), (3, 3, 2), (1, 1, 1)])
    assert _by_suffix(metrics, "chrf_full") == pytest.approx(whole, abs=1e-6)
    # corpus level, not the mean of sentence scores (25 and 100 for the continuations)
    assert _by_suffix(metrics, "chrf") != pytest.approx(62.5, abs=1)


def test_paraphrase_ties_predict_no(monkeypatch):
    """When " yes" and " no" score exactly the same, the prediction is "no" (the negative class),
    as evaluate.paraphrase_metrics documents; accuracy and F1 count it so."""
    monkeypatch.setattr(evaluate, "score_all", lambda model, items, **kw: torch.zeros(len(items)))
    rows = [{"prompt": "Q", "label": 1}, {"prompt": "Q", "label": 0}, {"prompt": "Q", "label": 0}]
    from prefnb.models import tiny_tokenizer

    metrics = evaluate.paraphrase_metrics(None, tiny_tokenizer(), rows, max_length=64, batch_size=4, device="cpu")
    assert _by_suffix(metrics, "accuracy") == pytest.approx(2 / 3)  # both label-0 rows right, the 1 wrong
    assert _by_suffix(metrics, "f1") == 0.0


def test_implicit_reward_accuracy_counts_ties_as_wrong():
    """A pair whose implicit reward margin is exactly 0 is not ranked right."""
    z = torch.zeros(4)
    chosen = torch.tensor([1.0, 0.0, -1.0, 2.0])
    assert evaluate.implicit_reward_accuracy(chosen, z, z, z) == pytest.approx(2 / 4)  # ties (0) and -1 are wrong


def test_line_budget_masks_eos_until_each_row_has_its_lines_then_stops_the_row():
    # vocabulary: 0 = a word, 1 = "\n", 2 = "\n\n", 3 = EOS; prompts are 2 tokens wide
    budget = evaluate.LineBudget(torch.tensor([0, 1, 2, 0]), lines=torch.tensor([2, 1, 2]), prompt_length=2,
                                 eos_token_id=3)
    ids = torch.tensor([[1, 1, 0, 1],    # one newline written (the prompt's two do not count)
                        [0, 0, 1, 0],    # one newline written: its budget
                        [0, 0, 2, 0]])   # "\n\n" is two lines
    scores = budget(ids, torch.zeros(3, 4))
    assert scores[:, 3].tolist() == [float("-inf"), 0.0, 0.0] and scores[:, :3].eq(0).all()
    assert budget.done(ids).tolist() == [False, True, True]


def test_tiny_generation_with_a_line_budget_never_exceeds_it():
    from prefnb import models

    model, tokenizer = models.build_tiny(seed=0)
    texts = evaluate.generate(model, tokenizer, ["a\nb\n", "c\n"], lines=[1, 2], max_new_tokens=40, greedy=False,
                              top_p=1.0, temperature=3.0, seed=0, batch_size=2, max_length=64, device="cpu")
    assert [t.count("\n") <= n for t, n in zip(texts, [1, 2])] == [True, True], texts
