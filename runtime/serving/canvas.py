"""The answer canvas of a diffusion stream (`stream_canvas`): after each step every answer position, masked or
committed, with its text piece and the step that committed it. A committed token never changes, so each step
decodes only the positions it committed."""

from __future__ import annotations

from llada_v import SpecialTokens


class Canvas:
    def __init__(self, tokenizer, special: SpecialTokens):
        self.tokenizer, self.special = tokenizer, special
        self.pieces: list[str | None] = []
        self.committed_at: list[int | None] = []

    def update(self, ids: list[int], step: int) -> dict:
        """The canvas after `step` (the steps the request has taken), for answer ids with masks: {"step", "ids",
        "pieces" (the text of each committed token, special tokens spelled out; null where masked),
        "committed_at" (the step that committed each position; null where masked), "mask_id", "eot_id"}."""
        if not self.pieces:
            self.pieces, self.committed_at = [None] * len(ids), [None] * len(ids)
        for position, token in enumerate(ids):
            if token != self.special.mask and self.committed_at[position] is None:
                self.committed_at[position] = step
                self.pieces[position] = self.tokenizer.decode([token], skip_special_tokens=False)
        return {"step": step, "ids": ids, "pieces": self.pieces, "committed_at": self.committed_at,
                "mask_id": self.special.mask, "eot_id": self.special.eot}
