"""Tiny checkpoints in the released LLaDA-V layout, for the fidelity tests: the released config.json keys,
the released tensor names in bf16 shards with an index, and a tokenizer whose special tokens sit at their
real ids (BOS 126080 ... <|eot_id|> 126348, so len(tokenizer) = 126,349) under a 126,464-row vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llada_v import LladaV, save_model
from llada_v.config import LanguageConfig, LladaVConfig, VisionConfig, default_grid_pinpoints
from llada_v.tiny import CHAT_TEMPLATE, init_weights
from llada_v.tokenizer import SYSTEM_PROMPT

VOCAB_ROWS = 126464
FIRST_SPECIAL, LAST_SPECIAL = 126080, 126348
SPECIAL_IDS = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
               126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}
EOT, MASK = 126348, 126336
CORPUS = [SYSTEM_PROMPT, "What is in the image?", "Describe the picture in one sentence.", "How many shapes are there?",
          "Which of the two images is brighter?", "Tell me a short story about a red square and a blue circle."]
# The keys of the released config.json that the loaders read, beside the tiny sizes.
RELEASED_KEYS = {"architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "rope_scaling": None,
                 "mm_vision_tower": "google/siglip2-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
                 "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad", "mm_use_im_start_end": False,
                 "mm_use_im_patch_token": False, "image_aspect_ratio": "anyres_max_4", "mm_newline_position": "grid",
                 "tokenizer_padding_side": "right", "torch_dtype": "bfloat16", "use_cache": False,
                 "transformers_version": "4.43.1",
                 "tokenizer_model_max_length": 8192}


def tiny_released_config() -> LladaVConfig:
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=64, patch_size=32)
    language = LanguageConfig(vocab_size=VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    return LladaVConfig(language=language, vision=vision, image_grid_pinpoints=default_grid_pinpoints(64))


def write_tokenizer(folder: Path, special_names: dict[int, str] | None = None) -> None:
    """A byte-level BPE of the corpus, filler entries up to id 126,079, then the special tokens at their ids
    (special_names: the content of each, by id; LLaDA-V's named tokens and reserved tokens by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL)})
    contents = special_names or {i: SPECIAL_IDS.get(i, f"<|reserved_token_{i - FIRST_SPECIAL}|>")
                                 for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)}
    spec["added_tokens"] = [{"id": i, "content": contents[i],
                             "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                             "special": True} for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(spec)).save(str(folder / "tokenizer.json"))
    names = {"bos_token": SPECIAL_IDS[126080], "eos_token": SPECIAL_IDS[126081], "pad_token": SPECIAL_IDS[126081],
             "additional_special_tokens": [SPECIAL_IDS[MASK]]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, **names}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(names, indent=2))


def write_checkpoint(folder: Path, seed: int = 0, eot_scale: float = 0.0, favour_mask: bool = False) -> Path:
    """The checkpoint; its vocabulary padding rows (126,349 on) are made to win almost every argmax, as
    untrained rows might, so that any code reading them shows. eot_scale > 0 makes <|eot_id|> the answer at
    some positions (the other rows' logits are ~N(0, 1)); favour_mask makes the mask token the likeliest
    prediction at most positions."""
    model = LladaV(tiny_released_config())
    init_weights(model, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.denoiser.lm_head.weight
        padding = torch.randn(VOCAB_ROWS - LAST_SPECIAL - 1, head.shape[1], generator=generator)
        head[LAST_SPECIAL + 1:] = 50 * padding / padding.norm(dim=1, keepdim=True)  # logits ~ N(0, 50^2)
        if eot_scale:
            direction = torch.randn(head.shape[1], generator=generator)
            head[EOT] = eot_scale * direction / direction.norm()  # its logit ~ N(0, eot_scale^2)
        if favour_mask:
            head[MASK] = head[LAST_SPECIAL + 1]
    save_model(model, folder, dtype=torch.bfloat16, max_shard_bytes=8_000_000)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **RELEASED_KEYS}, indent=2))
    write_tokenizer(folder)
    return folder
