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
    def __init__(self, config: GenerationConfig, banned_ids: torch.Tensor):
        self.config = config
        self.banned_ids = banned_ids

    def __call__(self, logits: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                 generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, K, V] of the block, eligible bool [b, K], k int64 [b], one generator per row.

        Returns x0 int64 [b, K] and commit bool [b, K].
        """
        cfg = self.config
        x0, _, commit = triton_kernels.remask(logits, eligible, k, temperature=float(cfg.temperature),
                                              banned_ids=self.banned_ids, threshold=cfg.threshold,
                                              generator=list(generators) if cfg.temperature > 0 else None)
        if cfg.remasking == "random":
            # Drawn after the Gumbel noise, from the same per-request generator.
            draws = torch.stack([torch.rand(logits.shape[1], generator=g, device=logits.device) for g in generators])
            commit = select_commit(draws.neg().masked_fill(~eligible, float("inf")), eligible, k)
        return x0, commit
