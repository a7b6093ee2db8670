"""The batch the loop decodes: left-padded prompt embeddings followed by the answer positions, one row per
request; rows can be placed anew and the batch regrouped between steps (iteration-level batching)."""

from __future__ import annotations

import torch

from ..backends.runner import Runner


class Batch:
    """Left-padded prompt embeddings followed by the answer positions, for B rows on the runner's device."""

    def __init__(self, embeds, attention_mask, tokens, gen_start: int):
        self.embeds = embeds  # [B, L, C]
        self.attention_mask = attention_mask  # [B, L] int64, 0 on left padding
        self.position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # from 0 at each row's first real token
        self.tokens = tokens  # [B, G] answer ids, the mask id where still masked
        self.gen_start = gen_start
        self.prompt_lengths = attention_mask[:, :gen_start].sum(1).tolist()

    @classmethod
    def left_padded(cls, prompts: list[torch.Tensor], gen_length: int, mask_id: int, runner: Runner) -> "Batch":
        prompt_length = max(len(p) for p in prompts)
        length, n_rows = prompt_length + gen_length, len(prompts)
        embeds = torch.zeros((n_rows, length, prompts[0].shape[-1]), dtype=runner.dtype, device=runner.device)
        mask = torch.zeros((n_rows, length), dtype=torch.int64, device=runner.device)
        for r, prompt in enumerate(prompts):
            embeds[r, prompt_length - len(prompt):prompt_length] = prompt
            mask[r, prompt_length - len(prompt):] = 1
        tokens = torch.full((n_rows, gen_length), mask_id, dtype=torch.int64, device=runner.device)
        return cls(embeds, mask, tokens, prompt_length)

    @property
    def size(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def prompt(self, row: int) -> torch.Tensor:
        """Row `row`'s prompt embeddings [Lp, C], without its left padding."""
        return self.embeds[row, self.gen_start - self.prompt_lengths[row]:self.gen_start]

    def place(self, row: int, prompt: torch.Tensor, mask_id: int) -> None:
        """Row `row` becomes a new row for `prompt` (which fits in front of gen_start), all masks."""
        first = self.gen_start - len(prompt)
        self.embeds[row].zero_()
        self.embeds[row, first:self.gen_start] = prompt
        self.attention_mask[row] = 0
        self.attention_mask[row, first:] = 1
        self.position_ids[row] = (self.attention_mask[row].cumsum(0) - 1).clamp(min=0)
        self.tokens[row] = mask_id
        self.prompt_lengths[row] = len(prompt)

    def regrouped(self, keep: list[int], prompts: list[torch.Tensor], mask_id: int, runner: Runner) -> "Batch":
        """Rows `keep` of this batch (their answers so far) followed by new rows for `prompts`, left-padded anew."""
        batch = Batch.left_padded([self.prompt(r) for r in keep] + prompts, self.tokens.shape[1], mask_id, runner)
        batch.tokens[:len(keep)] = self.tokens[keep]
        return batch

    def embed_answers(self, runner: Runner) -> None:
        self.embeds[:, self.gen_start:] = runner.embed(self.tokens)

    def rows_index(self, rows: list[int], always: bool = False) -> torch.Tensor | None:
        """Index tensor of `rows`, or None when they are all rows in order (then no gather is needed)."""
        if not always and rows == list(range(self.size)):
            return None
        return torch.tensor(rows, dtype=torch.int64, device=self.embeds.device)

    def select(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = self.rows_index(rows)
        tensors = (self.embeds, self.position_ids, self.attention_mask)
        return tensors if index is None else tuple(t.index_select(0, index) for t in tensors)
