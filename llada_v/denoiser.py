"""LLaDA's bidirectional transformer (the mask predictor), with LLaMA-style module names.

One forward serves both the full pass and the cached pass of the refresh-interval cache: the
queries' own keys/values are always computed, and cached keys/values of other positions, when
given, are attended to as well. Attention is never causal; masks only remove padding or stale slots.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig

# Added to the scores of masked keys. Finite, so a query whose keys are all masked (padding) stays NaN-free.
MASKED_SCORE = -1e30


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, L] -> cos, sin [B, 1, L, head_dim], always fp32 (angles lose precision in fp16)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)  # LLaMA's rotate_half
    out = xf * cos + rotated * sin
    # A no-op Cast in an fp32 graph would copy the keys: ONNX Runtime cannot drop one that writes a graph output.
    return out if out.dtype == x.dtype else out.to(x.dtype)


class Attention(nn.Module):
    # The eager full pass runs PyTorch's fused attention (its kernels keep the softmax statistics in fp32);
    # the explicit form below is what the ONNX graphs are traced from, and what the fused one is tested against.
    fused_full_pass = True

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, key_bias, past_k=None, past_v=None):
        # x: [B, Q, C]; key_bias: [B, 1, 1, Lc + Q] fp32; past_k/v: [B, H, Lc, D]
        b, q_len, c = x.shape
        q, k, v = (proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = self.head_dim**-0.5
        if past_k is None and self.fused_full_pass and not torch.onnx.is_in_onnx_export():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias == 0, scale=scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, q_len, c)), k, v
        scores = (q @ k.transpose(-1, -2)).float() * scale
        if past_k is not None:
            # Scores against the cache and against the fresh keys are joined instead of the keys
            # themselves, so the cache [B, H, Lc, D] is read in place, never copied.
            scores = torch.cat(((q @ past_k.transpose(-1, -2)).float() * scale, scores), dim=-1)
        probs = (scores + key_bias).softmax(dim=-1).to(v.dtype)
        if past_v is None:
            out = probs @ v
        else:
            past_len = past_k.shape[2]
            out = probs[..., :past_len] @ past_v + probs[..., past_len:] @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, c)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_bias, past_k=None, past_v=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, key_bias, past_k, past_v)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Denoiser(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index,
                past_keys=None, past_values=None, past_mask=None):
        """Logits at the asked positions, and the queries' keys/values of every layer.

        inputs_embeds [B, Q, C]; position_ids [B, Q]; attention_mask [B, Q] (1 = real position);
        logits_index [B, P] (indices into Q); past_keys/past_values: per layer [B, H, Lc, D] (a stacked
        [n_layers, B, H, Lc, D] tensor or a sequence of tensors) and past_mask [B, Lc] (1 = attend) for
        the cached pass, or None for the full pass.
        Returns logits [B, P, V] fp32, present_keys/present_values: tuples of n_layers [B, H, Q, D].
        """
        key_mask = attention_mask if past_mask is None else torch.cat((past_mask, attention_mask), dim=1)
        key_bias = torch.where(key_mask[:, None, None, :].bool(), 0.0, MASKED_SCORE)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = inputs_embeds.to(self.embed_tokens.weight.dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past_k = None if past_keys is None else past_keys[i]
            past_v = None if past_values is None else past_values[i]
            x, k, v = layer(x, cos, sin, key_bias, past_k, past_v)
            keys.append(k)
            values.append(v)
        index = logits_index[..., None].expand(-1, -1, x.shape[-1])
        hidden = self.norm(torch.gather(x, 1, index))
        return self.lm_head(hidden).float(), tuple(keys), tuple(values)
