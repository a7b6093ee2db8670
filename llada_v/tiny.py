"""The project's own small LLaDA-V: its tokenizer and a seeded random checkpoint in the real layout.

`python -m llada_v.tiny --out DIR` writes a fresh one. The shipped model (`SHIPPED_MODEL_DIR`) is
loaded through the same code as a real checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .config import tiny_config
from .model import LladaV
from .tokenizer import SYSTEM_PROMPT, SpecialTokens
from .weights import save_model

# LLaDA's chat template, as in the released tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


def build_tokenizer(corpus: list[str], folder: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE on `corpus`, add LLaDA's special tokens, save it; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SpecialTokens.NAMES.values())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    names = SpecialTokens.NAMES
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": names["bos"], "eos_token": names["eos"], "pad_token": names["eos"],
        "additional_special_tokens": [names["mask"]], "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": names["bos"], "eos_token": names["eos"], "pad_token": names["eos"],
        "additional_special_tokens": [names["mask"]]}, indent=2) + "\n")
    return tokenizer.get_vocab_size()


def random_model(folder: Path, corpus: list[str], seed: int = 0) -> LladaV:
    """A seeded random tiny LLaDA-V with its tokenizer, saved to `folder`."""
    vocab = build_tokenizer(corpus, folder)
    torch.manual_seed(seed)
    model = LladaV(tiny_config(vocab_size=vocab))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
            continue  # norms stay at their identity initialisation
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 or "newline" in name else torch.nn.init.zeros_(p)
    save_model(model, folder)
    return model


DEFAULT_CORPUS = [SYSTEM_PROMPT, "What colour is the square? What shape is left of the circle? How many shapes are there?",
                  "red green blue yellow purple orange circle square triangle left right above below one two three four"]


def main() -> None:
    parser = argparse.ArgumentParser(description="write a seeded random tiny LLaDA-V checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random_model(args.out, DEFAULT_CORPUS, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
