"""Pieces for the project's own small LLaDA-V models: a tokenizer carrying LLaDA's special tokens and
chat template, and seeded random initialisation (benchmarks/demo_model trains the shipped model from it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import LladaV
from .tokenizer import SpecialTokens

# LLaDA's chat template, as in the released tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


def build_tokenizer(corpus: list[str], folder: Path, vocab_size: int = 512, phrases: tuple[str, ...] = ()) -> int:
    """Train a byte-level BPE on `corpus`, add LLaDA's special tokens, save it; returns its size.

    Each of `phrases` becomes one (non-special) token of its own, matched before BPE splits the text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SpecialTokens.NAMES.values())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken(phrase, normalized=False) for phrase in phrases])
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


# Why not GPT-2's N(0, 0.02) everywhere: at these widths (128-192) it is several times below 1/sqrt(fan_in),
# attention starts almost uniform, and the demo model's question -> image lookups form about twice as late.
# Why the vision position embeddings start large: Adam moves every weight by about the learning rate, so the patch
# embedding's output (fan-in 3,072) grows several-fold during training while a position embedding stays near where
# it starts; started small, an object's cell is too faint in its projected token for two-step questions ("What
# colour is the shape right of the square?"). README, Measured choices, has the figures.
TOKEN_EMBEDDING_STD = 0.02
VISION_POSITION_STD = 4.0


def init_weights(model: LladaV, seed: int) -> None:
    """Seeded random weights: N(0, 1/fan_in) matrices, N(0, TOKEN_EMBEDDING_STD^2) token embeddings and
    `image_newline`, N(0, VISION_POSITION_STD^2) vision position embeddings, zero biases, identity norms."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ("layer_norm" in name and name.endswith("weight")):
                continue  # norms keep their identity initialisation
            if name.endswith("position_embedding.weight"):
                param.normal_(std=VISION_POSITION_STD)
            elif "embed_tokens" in name or "newline" in name:
                param.normal_(std=TOKEN_EMBEDDING_STD)
            elif param.dim() > 1:
                param.normal_(std=param[0].numel() ** -0.5)  # fan_in: all but the output dimension
            else:
                param.zero_()
