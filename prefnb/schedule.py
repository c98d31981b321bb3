"""When the loop sees what: the order of the training examples and the learning rate.

Both are pure functions of the step, so a run resumed at step k continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def lr_scheduler(optimizer, kind: str, *, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then linear decay to 0, half a cosine down to 0, or constant.

    The same multipliers as transformers' `get_scheduler` ("linear", "cosine",
    "constant_with_warmup"; a test compares them), without importing its trainer stack,
    which costs seconds of start-up on a small CPU.
    """
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def micro_batches(steps: range, *, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
                  ) -> list[list[int]]:
    """Example indices of micro-batches ``steps`` on one process.

    The data is an endless stream of epochs, each a permutation seeded by (seed, epoch);
    micro-batch m of the global run covers stream positions [m·B·W, (m+1)·B·W), and
    process r takes its B of them.
    """
    @functools.lru_cache(maxsize=1)  # the current epoch's: positions only move forward
    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def example(pos: int) -> int:
        epoch, offset = divmod(pos, n)
        return int(permutation(epoch)[offset])

    return [[example(pos) for pos in range((m * world + rank) * batch_size, (m * world + rank + 1) * batch_size)]
            for m in steps]


def batch_indices(micro_step: int, **stream) -> list[int]:
    """Example indices of one micro-batch (:func:`micro_batches`' arguments)."""
    return micro_batches(range(micro_step, micro_step + 1), **stream)[0]
