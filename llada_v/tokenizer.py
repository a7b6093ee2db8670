"""The checkpoint's tokenizer, its special tokens and LLaDA-V's conversation format."""

from __future__ import annotations

import json
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
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_bytes())
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                raise CheckpointError(f"{folder / name} is not valid JSON ({err}): copy the checkpoint's "
                                      f"tokenizer files again") from err
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as err:  # tokenizers and transformers raise assorted types for malformed files
        raise CheckpointError(f"cannot read the tokenizer in {folder} (tokenizer.json, tokenizer_config.json): "
                              f"{type(err).__name__}: {err}") from err


def place_images(texts: list[str], n_images: int, where: str) -> list[str]:
    """`texts` (a conversation's turns, or one turn) with one `<image>` per image: as written when they hold
    `n_images` placeholders; with none, the placeholders go before the last text, joined by spaces, then a newline
    (the official evaluation, llava_onevision_llada.py:524-526); ValueError naming `where` otherwise."""
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if placeholders == 0 and n_images:
        return [*texts[:-1], " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + texts[-1]]
    if placeholders != n_images:
        raise ValueError(f"{where} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s): "
                         f"put one {IMAGE_PLACEHOLDER} per image, in order (or none at all)")
    return list(texts)


def conversation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a LLaDA-V conversation ending with the assistant header.

    messages: [{"role": "user"|"assistant", "content": str}], where a user turn may contain `<image>`
    placeholders; each becomes IMAGE_TOKEN_INDEX. A system turn is prepended unless one is given.
    Tokenised as the official `tokenizer_image_token` (llava/mm_utils.py:342-355): the text is split at
    every `<image>`, each chunk tokenised on its own, and, since the prompt starts with BOS, the first
    token of every later chunk is dropped (so the `\n` written after `<image>` is not in the prompt).
    """
    if not messages or messages[0].get("role") != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    first, *rest = [tokenizer(chunk)["input_ids"] for chunk in text.split(IMAGE_PLACEHOLDER)]
    offset = 1 if first and first[0] == tokenizer.bos_token_id else 0
    ids = list(first)
    for chunk in rest:
        ids += [IMAGE_TOKEN_INDEX, *chunk[offset:]]
    return ids


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a text-only LLaDA conversation as the official chat.py makes them: the chat template rendered
    with the assistant header last, tokenised whole (`<image>` is text like any other); no system turn is added."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text)["input_ids"]


def plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text taken as it is (a completion prompt): BOS, as every conversation starts, then the text's
    tokens; no chat template, and `<image>` is only text."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
