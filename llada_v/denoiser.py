"""LLaDA's bidirectional transformer (the mask predictor), with LLaMA-style module names.

One forward serves both the full pass and the cached pass of the refresh-interval cache: the
queries' own keys/values are always computed, and cached keys/values of other positions, when
given, are attended to as well. Attention is never causal; masks only remove padding or stale slots.

The cache comes in two forms. Exported graphs read `past_keys`/`past_values` as inputs and join the
scores against them and against the fresh keys (the explicit form below, which the ONNX graphs are traced
from). In eager PyTorch a `SlotCache` is updated in place instead: each layer writes the queries' fresh
keys/values into their slots and attends over the whole buffer, with the attention backend chosen once
(`Denoiser.set_attention`): PyTorch's SDPA, the Triton kernel, or the explicit form.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig

# Added to the scores of masked keys. Finite, so a query whose keys are all masked (padding) stays NaN-free.
MASKED_SCORE = -1e30
ATTENTION_BACKENDS = ("sdpa", "triton", "explicit")


@dataclass
class SlotCache:
    """A KV cache updated in place by the forward: per layer [B, H, L, D] buffers (a stacked [n_layers, ...]
    tensor indexes as one); the queries' fresh keys/values go into slots [start, start + Q), then the queries
    attend over the whole buffer where `valid` [B, L] is True."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    valid: torch.Tensor


class KeyMask:
    """Which keys each query may read, in the form each attention backend takes, made once per forward."""

    def __init__(self, valid: torch.Tensor, dtype: torch.dtype):
        self.valid = valid  # bool [B, Lk]
        # Additive, so a row with no key to read (a batch's free place) stays finite; none where every key is read.
        masked_score = max(MASKED_SCORE, torch.finfo(dtype).min)
        self.bias = None if bool(valid.all()) else torch.where(valid, 0.0, masked_score).to(dtype)[:, None, None, :]


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
    """backend: how the eager full pass and the SlotCache pass attend ("sdpa": PyTorch's fused attention, whose
    kernels keep the softmax statistics in fp32; "triton": triton_kernels.attention for the SlotCache pass, on
    CUDA (its reference elsewhere); "explicit": the form the ONNX graphs are traced from, which the others are
    tested against). A cache given as past_k/past_v, and any forward being exported, take the explicit form."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.backend = "sdpa"

    def forward(self, x, cos, sin, key_bias, past_k=None, past_v=None, slots=None):
        # x: [B, Q, C]; key_bias: [B, 1, 1, Lc + Q] fp32; past_k/v: [B, H, Lc, D];
        # slots: (cache_k, cache_v [B, H, L, D], start, KeyMask over the L slots) to update in place
        b, q_len, c = x.shape
        q, k, v = (proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = self.head_dim**-0.5
        if slots is not None:
            cache_k, cache_v, start, keys = slots
            cache_k[:, :, start:start + q_len] = k
            cache_v[:, :, start:start + q_len] = v
            out = self._attend(q, cache_k, cache_v, keys, scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, q_len, c)), k, v
        if past_k is None and self.backend != "explicit" and not torch.onnx.is_in_onnx_export():
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

    def _attend(self, q, k, v, keys: KeyMask, scale: float) -> torch.Tensor:
        """q [B, H, Q, D] against a whole cache buffer k, v [B, H, L, D], where keys.valid."""
        if self.backend == "triton":
            import triton_kernels

            return triton_kernels.attention(q, k, v, key_mask=keys.valid, scale=scale)
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keys.bias, scale=scale)
        scores = (q @ k.transpose(-1, -2)).float() * scale
        probs = scores.masked_fill(~keys.valid[:, None, None, :], MASKED_SCORE).softmax(dim=-1)
        return probs.to(v.dtype) @ v


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

    def forward(self, x, cos, sin, key_bias, past_k=None, past_v=None, slots=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, key_bias, past_k, past_v, slots)
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

    def set_attention(self, backend: str) -> None:
        """How every layer attends in eager PyTorch (Attention's backends); exported graphs are always explicit."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
        for layer in self.layers:
            layer.self_attn.backend = backend

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index,
                past_keys=None, past_values=None, past_mask=None, slot_cache: SlotCache | None = None):
        """Logits at the asked positions, and the queries' keys/values of every layer.

        inputs_embeds [B, Q, C]; position_ids [B, Q]; attention_mask [B, Q] (1 = real position);
        logits_index [B, P] (indices into Q); the cached pass takes either past_keys/past_values: per layer
        [B, H, Lc, D] (a stacked [n_layers, B, H, Lc, D] tensor or a sequence of tensors) and past_mask [B, Lc]
        (1 = attend), the graphs' form, or slot_cache, updated in place; the full pass takes neither.
        Returns logits [B, P, V] fp32, present_keys/present_values: tuples of n_layers [B, H, Q, D].
        """
        if slot_cache is not None:
            key_bias = None  # the SlotCache pass masks with its KeyMask
            keys_read = KeyMask(slot_cache.valid, self.embed_tokens.weight.dtype)
        else:
            key_mask = attention_mask if past_mask is None else torch.cat((past_mask, attention_mask), dim=1)
            key_bias = torch.where(key_mask[:, None, None, :].bool(), 0.0, MASKED_SCORE)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = inputs_embeds.to(self.embed_tokens.weight.dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            past_k = None if past_keys is None else past_keys[i]
            past_v = None if past_values is None else past_values[i]
            slots = None if slot_cache is None else \
                (slot_cache.keys[i], slot_cache.values[i], slot_cache.start, keys_read)
            x, k, v = layer(x, cos, sin, key_bias, past_k, past_v, slots)
            keys.append(k)
            values.append(v)
        index = logits_index[..., None].expand(-1, -1, x.shape[-1])
        hidden = self.norm(torch.gather(x, 1, index))
        return self.lm_head(hidden).float(), tuple(keys), tuple(values)
