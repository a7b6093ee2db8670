"""An independent transcription of the official inference code of the text-only LLaDA models, the oracle of the
LLaDA tests. CI cannot download the official code, so its rules live here, written from its sources and sharing
nothing with the project but the checkpoint's tensor names and config keys:

- the model: `modeling_llada.py` of GSAI-ML/LLaDA-8B-Instruct (the Hugging Face remote code, copied in
  NVlabs/Fast-dLLM at 24cc59e as llada/model/modeling_llada.py; lines below are that file's), the path the
  released config takes (block_type llama, RMSNorm, RoPE, no biases, untied head), with the padding mask of the
  Hub file's October 2025 update (ML-GSAI/LLaDA EVAL.md: "we updated the modeling_llada.py file in Hugging Face
  to support attention mask inputs": a zero bias instead of the causal one, and the mask's -inf bias on padded
  keys passed to the attention, where Fast-dLLM's older copy passes attn_mask=None);
- `generate` and `add_gumbel_noise`, `get_num_transfer_tokens`: ML-GSAI/LLaDA generate.py at b7e6c35 (cfg_scale 0
  only: with cfg_scale > 0 and no attention_mask the official line 84 fails on an unbound name);
- `chat_turn`: one turn of ML-GSAI/LLaDA chat.py at b7e6c35.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

# configuration_llada.py's ModelConfig defaults (:154-381) of the keys read here.
DEFAULTS = {"d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-05, "block_type": "sequential", "activation_type": "swiglu",
            "layer_norm_type": "default", "rope": False, "alibi": False, "weight_tying": True, "include_bias": False,
            "include_qkv_bias": False, "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
            "block_group_size": 1, "rope_full_precision": True}
# The values of the released config: the only path transcribed here.
RELEASED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
            "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False,
            "input_emb_norm": False, "scale_logits": False, "block_group_size": 1, "rope_full_precision": True}


class LLaDAModelLM:
    """model(input_ids, attention_mask=None).logits, in float32, as LLaDAModelLM.forward computes them."""

    device = torch.device("cpu")

    def __init__(self, folder: Path):
        raw = json.loads((folder / "config.json").read_text())
        self.config = SimpleNamespace(**{key: raw.get(key, default) for key, default in DEFAULTS.items()})
        for key, value in RELEASED.items():
            assert getattr(self.config, key) == value, f"only the released config's path is transcribed: {key}"
        assert self.config.n_kv_heads in (None, self.config.n_heads), "only multi-head attention is transcribed"
        files = sorted(folder.glob("*.safetensors"))
        self.weights = {}
        for path in files:
            with safe_open(path, "pt") as f:
                self.weights.update({key: f.get_tensor(key).float() for key in f.keys()})

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.forward(input_ids, attention_mask))

    def forward(self, input_ids, attention_mask=None):  # LLaDAModel.forward, :1324-1524
        w, cfg = self.weights, self.config
        batch_size, seq_len = input_ids.shape
        x = F.embedding(input_ids, w["model.transformer.wte.weight"])
        attention_bias = None
        if attention_mask is not None and 0.0 in attention_mask:  # :1402-1405
            attention_mask = attention_mask.to(dtype=torch.float).view(batch_size, -1)[:, None, None, :]
            attention_mask = (1.0 - attention_mask) * torch.finfo(attention_mask.dtype).min
            # the update: a bidirectional (zero) bias where the older code took the causal one
            attention_bias = torch.zeros((1, 1, seq_len, seq_len), dtype=torch.float) + attention_mask
            attention_bias.masked_fill_(attention_bias == float("-inf"), torch.finfo(attention_bias.dtype).min)
        for n in range(cfg.n_layers):
            x = self.block(f"model.transformer.blocks.{n}.", x, attention_bias)
        x = self.rms_norm(x, w["model.transformer.ln_f.weight"])  # :1509
        return F.linear(x, w["model.transformer.ff_out.weight"])  # :1519, weight_tying false

    def block(self, prefix, x, attention_bias):  # LLaDALlamaBlock.forward, :938-990
        w = self.weights
        x_normed = self.rms_norm(x, w[prefix + "attn_norm.weight"])
        q = F.linear(x_normed, w[prefix + "q_proj.weight"])
        k = F.linear(x_normed, w[prefix + "k_proj.weight"])
        v = F.linear(x_normed, w[prefix + "v_proj.weight"])
        att = self.attention(q, k, v, attention_bias, w[prefix + "attn_out.weight"])
        x = x + att
        og_x = x
        x = self.rms_norm(x, w[prefix + "ff_norm.weight"])
        x, x_up = F.linear(x, w[prefix + "ff_proj.weight"]), F.linear(x, w[prefix + "up_proj.weight"])
        x = F.silu(x)  # activation_type silu (:478-486)
        x = x * x_up
        x = F.linear(x, w[prefix + "ff_out.weight"])
        return og_x + x

    def attention(self, q, k, v, attention_bias, attn_out):  # LLaDABlock.attention, :694-777
        B, T, C = q.size()
        n_heads = self.config.n_heads
        q = q.view(B, T, n_heads, C // n_heads).transpose(1, 2)
        k = k.view(B, T, n_heads, C // n_heads).transpose(1, 2)
        v = v.view(B, T, n_heads, C // n_heads).transpose(1, 2)
        q, k = self.rotary(q, k)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, T, C)
        return F.linear(att, attn_out)

    def rotary(self, q, k):  # RotaryEmbedding, :388-460 (rope_full_precision: float32)
        q_, k_ = q.float(), k.float()
        dim = self.config.d_model // self.config.n_heads
        key_len = k_.shape[-2]
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        seq = torch.arange(key_len, dtype=torch.float)
        freqs = torch.einsum("i , j -> i j", seq, inv_freq)
        positions = torch.cat((freqs, freqs), dim=-1)
        pos_sin, pos_cos = positions.sin()[None, None, :, :], positions.cos()[None, None, :, :]

        def rotate_half(x):
            B, nh, T, hs = x.size()
            x1, x2 = x.view(B, nh, T, 2, hs // 2).unbind(dim=-2)
            return torch.cat((-x2, x1), dim=-1)

        def apply_rotary_pos_emb(sin, cos, t):
            return ((t * cos) + (rotate_half(t) * sin)).to(t.dtype)

        q_ = apply_rotary_pos_emb(pos_sin, pos_cos, q_)
        k_ = apply_rotary_pos_emb(pos_sin, pos_cos, k_)
        return q_.type_as(q), k_.type_as(k)

    def rms_norm(self, x, weight):  # RMSLayerNorm.forward, :340-352
        og_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.config.rms_norm_eps)
        x = x.to(og_dtype)
        return weight * x


# ---- generate.py -------------------------------------------------------------------------------------------------

def add_gumbel_noise(logits, temperature):  # :8-19
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (- torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(mask_index, steps):  # :22-40
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking='low_confidence', mask_id=126336, logits_eos_inf=False,
             confidence_eos_eot_inf=False):  # :43-120
    """The prompt [B, L] and the answer, [B, L + gen_length]. Sampling and random remasking draw from torch's
    global generator, as the official code does."""
    assert cfg_scale == 0., "classifier-free guidance is not transcribed"
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(model.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones((prompt.shape[0], gen_length),
                                                               dtype=attention_mask.dtype, device=model.device)],
                                   dim=-1)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (x[:, prompt.shape[1] + num_block * block_length:
                              prompt.shape[1] + (num_block + 1) * block_length:] == mask_id)
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = (x == mask_id)
            logits = model(x, attention_mask=attention_mask).logits
            if logits_eos_inf:
                logits[:, :, 126081] = -torch.inf
            logits_with_noise = add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            if confidence_eos_eot_inf:
                # at temperature 0 logits_with_noise is logits itself, so both ids lose their confidence;
                # with noise only <|eot_id|> does (line 98 as written)
                logits_with_noise[:, :, 126081] = logits[:, :, 126348] = -torch.inf
            if remasking == 'low_confidence':
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == 'random':
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# ---- chat.py -----------------------------------------------------------------------------------------------------

def chat_turn(model, tokenizer, prompt, user_input, gen_length=128, steps=128):  # :19-38
    """One turn: (the answer as chat.py prints it, the prompt the next turn continues). prompt: the previous
    turn's, None for the first."""
    m = [{"role": "user", "content": user_input}]
    user_input = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(user_input)['input_ids']
    input_ids = torch.tensor(input_ids).unsqueeze(0)
    prompt = input_ids if prompt is None else torch.cat([prompt, input_ids[:, 1:]], dim=1)
    out = generate(model, prompt, steps=steps, gen_length=gen_length, block_length=32, temperature=0., cfg_scale=0.,
                   remasking='low_confidence')
    answer = tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)[0]
    return answer, out[out != 126081].unsqueeze(0)  # "remove the <EOS>"
