"""One remasking step (DESIGN §3, steps 2–5) over the current block's logits, and the commit schedule.

The candidate tokens and low-confidence commits come from `triton_kernels.remask` (Triton on CUDA, the
PyTorch reference elsewhere). Random draws use one torch.Generator per request, so a request decodes
the same in a batch as alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

import triton_kernels
from triton_kernels.reference import select_commit

from ..config import GenerationConfig


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of a block's steps: masked // steps each, one more on the first masked % steps."""
    base, extra = divmod(masked, steps)
    return [base + (i < extra) for i in range(steps)]


class Remasker:
    """whole_sequence_draws: random remasking draws one number per position of the row's whole sequence and keeps
    the block's (LLaDA's generate.py, so a seed gives its draws); otherwise one per position of the block."""

    def __init__(self, config: GenerationConfig, banned_ids: torch.Tensor, whole_sequence_draws: bool = False):
        self.config = config
        self.banned_ids = banned_ids
        self.whole_sequence_draws = whole_sequence_draws

    def __call__(self, logits: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                 generators: Sequence[torch.Generator], spans: Sequence[tuple[int, int]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, K, V] of the block, eligible bool [b, K], k int64 [b], one generator per row, and per row
        (the block's first position in the row's sequence, the sequence's length).

        Returns x0 int64 [b, K] and commit bool [b, K].
        """
        cfg = self.config
        x0, _, commit = triton_kernels.remask(logits, eligible, k, temperature=float(cfg.temperature),
                                              banned_ids=self.banned_ids, threshold=cfg.threshold,
                                              generator=list(generators) if cfg.temperature > 0 else None)
        if cfg.remasking == "random":
            # Drawn after the Gumbel noise, from the same per-request generator.
            width = logits.shape[1]
            draws = torch.stack([self._draws(g, start, length, width, logits.device)
                                 for g, (start, length) in zip(generators, spans)])
            commit = select_commit(draws.neg().masked_fill(~eligible, float("inf")), eligible, k)
        return x0, commit

    def _draws(self, generator: torch.Generator, start: int, length: int, width: int, device) -> torch.Tensor:
        if self.whole_sequence_draws:
            return torch.rand(length, generator=generator, device=device)[start:start + width]
        return torch.rand(width, generator=generator, device=device)
