"""What the runs of one process share (:class:`Session`) and what one run's parts share (:class:`RunContext`).

Each memo is of a pure function of files or settings, keyed by what it depends on (a file by
`prefnb.cache.file_version`): it changes how often something is computed, never what.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


@dataclass
class Session:
    # Training runs started in this session's process: the CPU peak RSS is the process's, so
    # only the first run's is its own (`prefnb.timing.peak_memory_bytes`).
    runs_started: int = 0
    memos: dict[str, dict[Hashable, Any]] = field(default_factory=dict, repr=False)

    def memo(self, kind: str, key: Hashable, compute: Callable[[], T], *, keep: int = 4) -> T:
        """``compute()``, once per (``kind``, ``key``); at most ``keep`` keys per kind, the oldest goes."""
        table = self.memos.setdefault(kind, {})
        if key not in table:
            if len(table) >= keep:
                table.pop(next(iter(table)))
            table[key] = compute()
        return table[key]


@dataclass
class RunContext:
    """What one run's set-up made, which its parts share: `prefnb.train`'s steps, the
    objectives' plug-ins (`prefnb.plugins`) and the precomputations (`prefnb.precompute`)."""

    params: Any                 # prefnb.config.RunParams
    session: Session
    accelerator: Any            # accelerate.Accelerator: device, autocast, mixed precision, processes
    tokenizer: Any
    start_model: Any            # the starting policy; the reference too for reference policy/prior
    start_identity: str         # prefnb.models.weights_identity of the starting policy (cache keys)
    encoders: Any               # prefnb.precompute.Encoders
    out_dir: Path
    cache_dir: Path

    @property
    def device(self):
        return self.accelerator.device

    @property
    def hidden_size(self) -> int | None:
        """Decides shared-prompt pair rows (`prefnb.logprobs.collate_pairs`)."""
        return getattr(self.start_model.config, "hidden_size", None)
