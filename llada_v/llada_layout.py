"""The released checkpoint layout of the text-only LLaDA models (GSAI-ML/LLaDA-8B-Instruct, LLaDA-8B-Base,
LLaDA 1.5): the OLMo-style config.json and the tensor names, read without their remote code.

Sources (paths in NVlabs/Fast-dLLM at 24cc59e, whose llada/model/ holds the Hugging Face remote code):
`configuration_llada.py` (ModelConfig, its keys and defaults) and `modeling_llada.py` (what each key and
tensor does). LLaDA-V's `train/llada_v_prepare/rename_checkpoint.py` maps these tensor names onto the LLaMA
names of LLaDA-V's language tower, which are our modules' names.

The official model reads only the fields of its ModelConfig (`create_model_config_from_pretrained_config`,
modeling_llada.py:1526-1536), each taking its default when config.json lacks it (configuration_llada.py:459-469).
Every field is one of:

  mapped onto LanguageConfig   d_model, n_heads, n_layers, mlp_hidden_size (mlp_ratio * d_model when null),
                               rope_theta, rms_norm_eps, max_sequence_length, vocab_size and embedding_size
                               (the tables have `embedding_size or vocab_size` rows), n_kv_heads and
                               multi_query_attention (must come to n_heads: plain multi-head attention)
  implemented for one value    the keys of REQUIRED below, and bias_for_layer_norm (a norm bias); any other
                               value, or a missing key whose official default differs, is refused by name
  checked with the tokenizer   mask_token_id, eos_token_id, pad_token_id (weights.checkpoint_config): the model
                               never reads them; generate.py takes mask_id=126336 as an argument, chat.py
                               strips 126081 literally
  no effect on inference       attention_dropout, residual_dropout, embedding_dropout (dropout is off in eval,
                               modeling_llada.py:768, Dropout's F.dropout with self.training);
                               init_device, init_fn, init_std, init_cutoff_factor (initialisation only);
                               flash_attention (the same non-causal attention through flash-attn, :669-673);
                               precision, train_max_sequence_length (training settings the model never reads);
                               alibi_bias_max and attention_layer_norm_with_affine (read only with alibi or
                               attention_layer_norm true, which are refused)
Keys that are not ModelConfig fields (architectures, auto_map, model_type, use_cache, torch_dtype, ...) are never
read by the model code and are ignored here too.
"""

from __future__ import annotations

import math
import re

from .errors import CheckpointError

# key: (ModelConfig's default, the one value implemented, what that value means). Each changes the computation.
REQUIRED = {
    "block_type": ("sequential", "llama", "the LLaMA block: separate q/k/v projections and a gated MLP"),
    "activation_type": ("swiglu", "silu", "SiLU(ff_proj(x)) * up_proj(x) in the LLaMA block"),
    "layer_norm_type": ("default", "rms", "RMSNorm"),
    "layer_norm_with_affine": (True, True, "norms with a weight"),
    "rope": (False, True, "rotary position embeddings"),
    "rope_full_precision": (True, True, "rotary embeddings applied in float32"),
    "alibi": (False, False, "no ALiBi biases"),
    "attention_layer_norm": (False, False, "no norm of queries and keys"),
    "include_bias": (False, False, "linear layers without biases"),
    "include_qkv_bias": (False, False, "q/k/v projections without biases"),
    "input_emb_norm": (False, False, "embeddings not scaled by sqrt(d_model)"),
    "scale_logits": (False, False, "logits not scaled by 1/sqrt(d_model)"),
    "weight_tying": (True, False, "an output head of its own, model.transformer.ff_out"),
    "block_group_size": (1, 1, "blocks stored one by one as model.transformer.blocks.N"),
}
# ModelConfig's defaults of the other keys read here.
DEFAULTS = {"d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
            "max_sequence_length": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "vocab_size": 50257,
            "embedding_size": 50304, "multi_query_attention": None, "bias_for_layer_norm": None}
# Keys only this layout has: a config.json naming any of them is read as this layout.
MARKERS = ("d_model", "n_heads", "n_layers")


def is_llada_config(raw: dict) -> bool:
    return any(key in raw for key in MARKERS)


def language_fields(raw: dict) -> dict:
    """The LanguageConfig fields of a config.json in this layout; CheckpointError naming the key that is
    malformed or changes the computation in a way not implemented."""
    for key, (default, implemented, meaning) in REQUIRED.items():
        value = raw.get(key, default)
        if type(value) is not type(implemented) or value != implemented:
            absent = "" if key in raw else f" (config.json lacks {key}: the official default)"
            raise CheckpointError(f"{key} {value!r}{absent} is not implemented: only {key} {implemented!r} "
                                  f"({meaning}), as in the released LLaDA models")
    if _optional(raw, "bias_for_layer_norm", bool):  # None: as include_bias, false here
        raise CheckpointError("bias_for_layer_norm True is not implemented: norms have no bias in the released "
                              "LLaDA models")
    d_model, n_heads = _positive(raw, "d_model", int), _positive(raw, "n_heads", int)
    if d_model % n_heads:
        raise CheckpointError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
    mlp_hidden = _optional(raw, "mlp_hidden_size", int)
    vocab, rows = _positive(raw, "vocab_size", int), _optional(raw, "embedding_size", int)
    if rows is not None and rows < vocab:  # modeling_llada.py:1200-1202 raises
        absent = "" if "embedding_size" in raw else " (config.json lacks embedding_size: the official default)"
        raise CheckpointError(f"embedding_size {rows}{absent} is smaller than vocab_size {vocab}")
    return {"vocab_size": rows or vocab, "hidden_size": d_model,
            "intermediate_size": mlp_hidden or _positive(raw, "mlp_ratio", int) * d_model,
            "num_hidden_layers": _positive(raw, "n_layers", int), "num_attention_heads": n_heads,
            "num_key_value_heads": _key_value_heads(raw, n_heads),
            "rms_norm_eps": _positive(raw, "rms_norm_eps", float), "rope_theta": _positive(raw, "rope_theta", float),
            "max_position_embeddings": _positive(raw, "max_sequence_length", int)}


def config_dict(language) -> dict:
    """config.json in this layout for a LanguageConfig: its sizes, and every key of REQUIRED at its implemented
    value (written out, so that no official default is ever taken for them)."""
    return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": language.hidden_size,
            "n_heads": language.num_attention_heads, "n_kv_heads": language.num_key_value_heads,
            "n_layers": language.num_hidden_layers, "mlp_hidden_size": language.intermediate_size,
            "max_sequence_length": language.max_position_embeddings, "rope_theta": language.rope_theta,
            "rms_norm_eps": language.rms_norm_eps, "vocab_size": language.vocab_size,
            "embedding_size": language.vocab_size, "bias_for_layer_norm": False,
            **{key: implemented for key, (_, implemented, _) in REQUIRED.items()}}


def _key_value_heads(raw: dict, n_heads: int) -> int:
    """ModelConfig.effective_n_kv_heads (configuration_llada.py:387-405), which must be n_heads."""
    n_kv, multi_query = _optional(raw, "n_kv_heads", int), _optional(raw, "multi_query_attention", bool)
    if multi_query is None:
        heads = n_heads if n_kv is None else n_kv
    else:
        heads = 1 if multi_query else n_heads
        if n_kv is not None and n_kv != heads:
            raise CheckpointError(f"multi_query_attention {multi_query} and n_kv_heads {n_kv} contradict each other "
                                  f"(the official code raises)")
    if heads != n_heads:
        raise CheckpointError(f"n_kv_heads {heads} (with multi_query_attention {multi_query}) is not implemented: "
                              f"LLaDA uses plain multi-head attention, n_kv_heads = n_heads = {n_heads}")
    return heads


def _optional(raw: dict, key: str, kind: type):
    value = raw.get(key, DEFAULTS[key])
    if value is None:
        return None
    return _positive(raw, key, kind) if kind is not bool else _typed(key, value, bool)


def _positive(raw: dict, key: str, kind: type):
    value = _typed(key, raw.get(key, DEFAULTS[key]), kind)
    if not 0 < value < math.inf:
        raise CheckpointError(f"malformed config: {key} must be positive and finite, got {value!r}")
    return value


def _typed(key: str, value, kind: type):
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise CheckpointError(f"malformed config: {key} should be {kind.__name__}, got {value!r}")
    return value


# ---- tensor names ----------------------------------------------------------------------------------------------
# One block, LLaDALlamaBlock (modeling_llada.py:896-926 builds it, :938-990 runs it):
#   x_normed = attn_norm(x); q, k, v = q_proj(x_normed), k_proj(x_normed), v_proj(x_normed)     :953-956
#   x = x + attn_out(attention(q, k, v))                                                          :776, :970
#   x, x_up = ff_proj(ff_norm(x)), up_proj(ff_norm(x)); x = og_x + ff_out(act(x) * x_up)          :978-987
# so ff_proj is the gate (rename_checkpoint.py: ff_proj -> mlp.gate_proj, up_proj -> mlp.up_proj).
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
# wte: the token embedding (:1224-1226); ln_f: the final norm (:1509); transformer.ff_out: the head (:1246-1256, :1519).
MODEL_TENSORS = {
    "model.transformer.wte.weight": "denoiser.embed_tokens.weight",
    "model.transformer.ln_f.weight": "denoiser.norm.weight",
    "model.transformer.ff_out.weight": "denoiser.lm_head.weight",
}
LAYER_PREFIX = r"model\.transformer\.blocks\.(\d+)\."
_BLOCK_TENSOR = re.compile(LAYER_PREFIX + r"(\w+)\.weight")
_LAYER_PARAMETER = re.compile(r"denoiser\.layers\.(\d+)\.(.+)\.weight")


def to_module_key(key: str) -> str:
    """Checkpoint tensor name -> parameter name. Raises KeyError when the name is not of this layout."""
    if key in MODEL_TENSORS:
        return MODEL_TENSORS[key]
    match = _BLOCK_TENSOR.fullmatch(key)
    if not match or match[2] not in BLOCK_TENSORS:
        raise KeyError(key)
    return f"denoiser.layers.{match[1]}.{BLOCK_TENSORS[match[2]]}.weight"


def to_checkpoint_key(name: str) -> str:
    for key, module_name in MODEL_TENSORS.items():
        if name == module_name:
            return key
    match = _LAYER_PARAMETER.fullmatch(name)
    tensor = next((t for t, module in BLOCK_TENSORS.items() if match and module == match[2]), None)
    if tensor is None:
        raise KeyError(name)
    return f"model.transformer.blocks.{match[1]}.{tensor}.weight"
