"""The checkpoint's tokenizer, its special tokens and LLaDA-V's conversation format."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import CheckpointError

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's marker for "image embeddings go here" in a token sequence; never a vocabulary id.
IMAGE_TOKEN_INDEX = -200
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    bos: int
    eos: int
    eot: int
    start_header: int
    end_header: int

    NAMES = {"mask": "<|mdm_mask|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>", "eot": "<|eot_id|>",
             "start_header": "<|start_header_id|>", "end_header": "<|end_header_id|>"}

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        vocab = tokenizer.get_vocab()
        missing = [text for text in cls.NAMES.values() if text not in vocab]
        if missing:
            raise CheckpointError(f"tokenizer lacks LLaDA's special tokens {missing}")
        return cls(**{field: vocab[text] for field, text in cls.NAMES.items()})

    @property
    def banned_at_masked(self) -> tuple[int, ...]:
        """Ids the official sampler never places at a masked position (stopping relies on <|eot_id|>)."""
        return (self.eos, self.bos, self.start_header, self.end_header)


def load_tokenizer(folder: str | Path):
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json: copy the checkpoint's tokenizer files into it")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a LLaDA-V conversation ending with the assistant header.

    messages: [{"role": "user"|"assistant", "content": str}], where a user turn may contain `<image>`
    placeholders; each becomes IMAGE_TOKEN_INDEX. A system turn is prepended unless one is given.
    """
    if not messages or messages[0].get("role") != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids
