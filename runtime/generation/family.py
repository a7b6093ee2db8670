"""What a model family's official code decides that the loop does not: how a prompt is built, which ids are banned,
when an answer ends and how it is finished, how random remasking draws and how a chat's next turn continues.
LLaDA-V follows ML-GSAI/LLaDA-V, the text-only LLaDA models ML-GSAI/LLaDA's generate.py and chat.py; every rule
and each deliberate deviation is in docs/fidelity.md."""

from __future__ import annotations

from dataclasses import dataclass

from llada_v import SpecialTokens
from llada_v.config import LLADA, LLADA_V


@dataclass(frozen=True)
class FamilyRules:
    # The family also says how prompts become ids (generation/prompt.py request_ids). LLaDA-V's: its system turn
    # unless the conversation has one, `<image>` marks where an image goes, a plain prompt starts with BOS. LLaDA's
    # generate.py and chat.py: the chat template alone, `<image>` is text like any other, a plain prompt (the Base
    # model's) is tokenised as it is.
    family: str
    special: SpecialTokens
    # Never committed at a masked position.
    banned: tuple[int, ...]
    # Committing <|eot_id|> ends the answer before it (LLaDA-V); otherwise every step of every block runs and the
    # answer is all gen_length positions (LLaDA).
    stops_at_eot: bool
    # Random remasking draws one number per position of the row's whole sequence, prompt included, and takes the
    # block's (LLaDA's generate.py: torch.rand over x), so a seed gives the official draws; otherwise one per block
    # position.
    draws_whole_sequence: bool
    # A chat's next turn continues the previous turn's prompt and answer ids (LLaDA's chat.py); otherwise the
    # conversation's messages are rendered anew with the chat template every turn.
    chat_continues_ids: bool

    @classmethod
    def of(cls, family: str, special: SpecialTokens) -> "FamilyRules":
        # The mask token is banned in both families: committing it would leave the position masked.
        if family == LLADA_V:
            return cls(family, special, banned=(*special.banned_at_masked, special.mask), stops_at_eot=True,
                       draws_whole_sequence=False, chat_continues_ids=False)
        if family == LLADA:
            return cls(family, special, banned=(special.mask,), stops_at_eot=False,
                       draws_whole_sequence=True, chat_continues_ids=True)
        raise ValueError(f"unknown model family {family!r}")

    @property
    def image_placeholders(self) -> bool:
        return self.family == LLADA_V

    def stop_position(self, answer: list[int]) -> int:
        """Where the answer ends: its first <|eot_id|> when the family stops there, else its length."""
        eot = self.special.eot
        return answer.index(eot) if self.stops_at_eot and eot in answer else len(answer)

    def final_prefix(self, answer: list[int]) -> list[int]:
        """The part of a partly decoded answer that can no longer change: up to its first mask (or its end)."""
        end = self.stop_position(answer)
        mask = self.special.mask
        return answer[:answer.index(mask)] if mask in answer[:end] else answer[:end]

    def final_answer(self, answer: list[int]) -> tuple[list[int], str]:
        """The answer's ids and why it ended: "stop" when the model ended it, "length" when it ran to the end.
        LLaDA-V: the ids before <|eot_id|>. LLaDA: every position (its text skips the special tokens), "stop" when
        it holds <|eot_id|> or <|endoftext|> (the model's end of turn and the padding after it)."""
        stop = self.stop_position(answer)
        if self.stops_at_eot:
            return answer[:stop], "stop" if stop < len(answer) else "length"
        ended = self.special.eot in answer or self.special.eos in answer
        return list(answer), "stop" if ended else "length"
