"""Tiny checkpoints in the released layout of the text-only LLaDA models (GSAI-ML/LLaDA-8B-Instruct; LLaDA-8B-Base
and LLaDA 1.5 share it), for the LLaDA tests: LLaDA-8B-Instruct's config.json with tiny sizes, tensors under the
official names (written here from those names, not through the project's key map) in bf16 shards with an index,
and a tokenizer whose special tokens sit at their real ids under a 126,464-row vocabulary, with the real chat
template. The vocabulary is LLaDA-V's language tower's (released_layout.py), whose special tokens are the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import released_layout
from llada_v.tiny import CHAT_TEMPLATE
from llada_v.weights import save_tensors

VOCAB_ROWS = 126464
MASK, EOS, EOT = 126336, 126081, 126348
# LLaDA-8B-Instruct's config.json, its sizes made tiny (d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size).
RELEASED_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64, "embedding_dropout": 0.0,
    "embedding_size": VOCAB_ROWS, "eos_token_id": EOS, "flash_attention": False, "include_bias": False,
    "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
    "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": MASK, "max_sequence_length": 4096, "mlp_hidden_size": 128, "mlp_ratio": 4, "model_type": "llada",
    "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "pad_token_id": EOS,
    "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": VOCAB_ROWS, "weight_tying": False,
}
# LLaDA-8B-Instruct's tokenizer_config.json: its added tokens 126080-126348 (the mask in reserved token 252's
# place) and its other keys.
SPECIAL_TOKENS = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126082: "[CLS]", 126083: "[gMASK]",
                  **{126084 + i: f"<|reserved_token_{i}|>" for i in range(256)},
                  MASK: "<|mdm_mask|>", 126340: "<role>", 126341: "</role>", 126342: "<|arithmetic_start|>",
                  126343: "<|arithmetic_end|>", 126344: "<|number_start|>", 126345: "<|number_end|>",
                  126346: "<|start_header_id|>", 126347: "<|end_header_id|>", EOT: "<|eot_id|>"}
TOKENIZER_CONFIG = {
    "add_bos_token": False, "add_eos_token": False,
    "additional_special_tokens": ["<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>",
                                  "<|number_start|>", "<|number_end|>"],
    "bos_token": "<|startoftext|>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    "cls_token": "[CLS]", "eos_token": "<|endoftext|>", "fast_tokenizer": True, "gmask_token": "[gMASK]",
    "merges_file": None, "model_input_names": ["input_ids", "attention_mask"], "pad_token": "<|endoftext|>",
    "tokenizer_class": "PreTrainedTokenizerFast", "trust_remote_code": True, "vocab_file": None,
}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The released tensors of a config in this layout, as the official LLaDALlamaBlock and LLaDAModel build them."""
    d, hidden, rows = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    shapes = {"model.transformer.wte.weight": (rows, d)}
    for n in range(config["n_layers"]):
        block = f"model.transformer.blocks.{n}."
        shapes.update({block + name: shape for name, shape in (
            ("attn_norm.weight", (d,)), ("q_proj.weight", (d, d)), ("k_proj.weight", (d, d)), ("v_proj.weight", (d, d)),
            ("attn_out.weight", (d, d)), ("ff_norm.weight", (d,)), ("ff_proj.weight", (hidden, d)),
            ("up_proj.weight", (hidden, d)), ("ff_out.weight", (d, hidden)))})
    shapes.update({"model.transformer.ln_f.weight": (d,), "model.transformer.ff_out.weight": (rows, d)})
    return shapes


def random_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) matrices, N(0, 1) token embeddings and norms of weight 1 + N(0, 0.3^2): every tensor's
    values differ from every other's, so a tensor read in the wrong place changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            tensors[name] = 1 + 0.3 * noise
        else:
            tensors[name] = noise if name.endswith("wte.weight") else noise * shape[1] ** -0.5
    return tensors


def write_tokenizer(folder: Path) -> None:
    released_layout.write_tokenizer(folder, SPECIAL_TOKENS)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {key: TOKENIZER_CONFIG[key] for key in ("additional_special_tokens", "bos_token", "cls_token", "eos_token",
                                                "pad_token")}, indent=2))


def write_checkpoint(folder: Path, seed: int = 0, max_shard_bytes: int | None = 8_000_000,
                     config_edit: dict | None = None) -> Path:
    """The checkpoint: bf16 shards and their index (one model.safetensors when max_shard_bytes is None)."""
    config = {**RELEASED_CONFIG, **(config_edit or {})}
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(config, seed)
    save_tensors(((name, t.to(torch.bfloat16)) for name, t in tensors.items()), folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder)
    return folder
