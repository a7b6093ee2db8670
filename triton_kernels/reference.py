"""Plain-PyTorch references for the two kernels.

This module is the contract: the Triton launchers reuse its argument checks, its Gumbel noise and its
top-k selection, so both paths draw identical noise and commit the same positions (the reference ranks by
float64 confidences, the kernel by float32 complements: they can part only between confidences whose
complements agree to ~6 significant digits).
"""

import math
from typing import Optional, Sequence, Union

import torch

# u ~ U[0, 1) is clamped to this before -log(-log(u)), so u == 0 gives a finite (very negative) value.
GUMBEL_EPS = 1e-20
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_FLOAT_DTYPES = (torch.float16, torch.float32)

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"shape {tuple(t.shape)} dtype {t.dtype} on {t.device}"


def check_remask_inputs(logits, eligible, k, temperature, banned_ids, threshold, generator) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.dtype not in _FLOAT_DTYPES \
            or logits.shape[-1] == 0:
        raise ValueError(f"logits must be a [B, L, V >= 1] float16 or float32 tensor, got {_describe(logits)}")
    B, L, V = logits.shape
    dev = logits.device
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool or eligible.shape != (B, L) \
            or eligible.device != dev:
        raise ValueError(f"eligible must be a bool tensor of shape [{B}, {L}] on {dev}, got {_describe(eligible)}")
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape != (B,) or k.device != dev:
        raise ValueError(f"k must be an int64 tensor of shape [{B}] on {dev}, got {_describe(k)}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if banned_ids is not None and (not isinstance(banned_ids, torch.Tensor) or banned_ids.dtype != torch.int64
                                   or banned_ids.dim() != 1 or banned_ids.device != dev):
        raise ValueError(f"banned_ids must be None or a 1-D int64 tensor on {dev}, got {_describe(banned_ids)}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be None or a float in (0, 1], got {threshold!r}")
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, Sequence) or len(generator) != B \
            or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator must be None, a torch.Generator or a sequence of {B} generators "
                         f"(one per row), got {generator!r}")


def gumbel_noise(shape, temperature: float, generator: Generators, device) -> Optional[torch.Tensor]:
    """temperature * Gumbel(0, 1) noise, float32 [B, L, V]; None when temperature == 0.

    Row b is drawn as torch.rand((L, V)) from generator[b] (a sequence), from the one generator in row
    order, or from torch's default generator (None).
    """
    if temperature == 0:
        return None
    B, L, V = shape
    gens = list(generator) if isinstance(generator, Sequence) else [generator] * B
    noise = torch.empty((B, L, V), dtype=torch.float32, device=device)
    for b, g in enumerate(gens):
        torch.rand((L, V), generator=g, out=noise[b])
    noise.clamp_(min=GUMBEL_EPS).log_().neg_().log_().neg_()
    return noise.mul_(temperature)


def banned_vocab_mask(banned_ids: Optional[torch.Tensor], vocab: int, device) -> Optional[torch.Tensor]:
    if banned_ids is None or banned_ids.numel() == 0:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[banned_ids] = True
    return mask


def select_commit(rank_key: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                  above_threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Which eligible positions to commit: the k with the smallest rank_key per row (ties to the lower
    position), or, with `above_threshold` (threshold decoding), every eligible position it marks plus the
    first-ranked one. Never syncs the host.

    rank_key [B, L]: smaller commits first, +inf where not eligible (for low-confidence remasking, the
    complement 1 - confidence, which keeps its order where the confidence itself rounds to 1.0).
    """
    B, L = rank_key.shape
    order = torch.sort(rank_key, dim=1, stable=True).indices
    positions = torch.arange(L, device=rank_key.device).expand(B, L)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    if above_threshold is None:
        return eligible & (rank < k[:, None])
    return eligible & (above_threshold | (rank == 0))


# Positions whose float64 softmax is taken at once: bounds the float64 copy (64 x 126,464 x 8 B = 65 MB).
_FLOAT64_CHUNK = 64


def confidence_float64(clean: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(clean)[x0] and its complement sum_{i != x0} softmax(clean)_i, both float64 [B, L].

    The official loop takes this softmax in float64 (`F.softmax(logits.to(torch.float64))`); float32 rounds
    a confidence to exactly 1.0 once 1 - p < ~3e-8, and such positions (end-of-text padding, template tokens
    of a trained model) would then tie. The complement is summed over the other entries, never taken as
    1 - p, so it orders positions even where p rounds to 1.0 in float64.
    """
    flat_logits, flat_x0 = clean.reshape(-1, clean.shape[-1]), x0.reshape(-1, 1)
    confidence = torch.empty(flat_x0.shape[0], dtype=torch.float64, device=clean.device)
    complement = torch.empty_like(confidence)
    for start in range(0, flat_x0.shape[0], _FLOAT64_CHUNK):
        rows = slice(start, start + _FLOAT64_CHUNK)
        logits = flat_logits[rows].double()
        exp = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        picked = exp.gather(-1, flat_x0[rows])[:, 0]
        others = exp.scatter_(-1, flat_x0[rows], 0.0).sum(dim=-1)
        total = others + picked
        confidence[rows], complement[rows] = picked / total, others / total
    return confidence.view(x0.shape), complement.view(x0.shape)


def remask_topk(logits, eligible, k, *, temperature=0.0, banned_ids=None, threshold=None, generator=None):
    """Candidate tokens, their confidences and the positions to commit for one diffusion step.

    logits [B, L, V] fp16/fp32, eligible bool [B, L], k int64 [B].
    Returns x0 int64 [B, L], confidence float32 [B, L] (-inf where not eligible), commit bool [B, L].
    Confidences are taken in float64, as the official loop takes them, and positions are ranked by their
    complement (confidence_float64).
    """
    check_remask_inputs(logits, eligible, k, temperature, banned_ids, threshold, generator)
    clean = logits.float()
    banned = banned_vocab_mask(banned_ids, logits.shape[-1], logits.device)
    if banned is not None:
        clean = clean.masked_fill(eligible[:, :, None] & banned, float("-inf"))
    noise = gumbel_noise(logits.shape, temperature, generator, logits.device)
    x0 = torch.argmax(clean if noise is None else clean + noise, dim=-1)
    prob, complement = confidence_float64(clean, x0)
    above = None if threshold is None else prob > threshold
    commit = select_commit(complement.masked_fill(~eligible, float("inf")), eligible, k, above)
    return x0, prob.float().masked_fill(~eligible, float("-inf")), commit


def check_attention_inputs(q, k, v, kv_lens, key_mask) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be a [B, H, Lq, D] float16 or float32 tensor, got {_describe(q)}")
    B, H, Lq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} of q is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[:2] != (B, H) or t.shape[3] != D \
                or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be a [{B}, {H}, Lk, {D}] {q.dtype} tensor on {q.device}, "
                             f"got {_describe(t)}")
    Lk = k.shape[2]
    if v.shape[2] != Lk or Lk == 0:
        raise ValueError(f"k and v must have the same Lk >= 1, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if kv_lens is not None and (not isinstance(kv_lens, torch.Tensor) or kv_lens.shape != (B,)
                                or kv_lens.dtype not in (torch.int32, torch.int64) or kv_lens.device != q.device):
        raise ValueError(f"kv_lens must be None or an int32/int64 tensor of shape [{B}] on {q.device}, "
                         f"got {_describe(kv_lens)}")
    if key_mask is not None and (not isinstance(key_mask, torch.Tensor) or key_mask.shape != (B, Lk)
                                 or key_mask.dtype != torch.bool or key_mask.device != q.device):
        raise ValueError(f"key_mask must be None or a bool tensor of shape [{B}, {Lk}] on {q.device}, "
                         f"got {_describe(key_mask)}")


def key_validity(kv_lens, key_mask, batch: int, keys: int, device) -> torch.Tensor:
    """bool [B, Lk]: True where a key may be attended to."""
    valid = torch.ones((batch, keys), dtype=torch.bool, device=device)
    if kv_lens is not None:
        valid &= torch.arange(keys, device=device)[None, :] < kv_lens[:, None]
    if key_mask is not None:
        valid &= key_mask
    return valid


def cached_attention(q, k, v, *, kv_lens=None, key_mask=None, scale=None):
    """Non-causal attention of q [B, H, Lq, D] against k, v [B, H, Lk, D], computed in fp32.

    Keys at index >= kv_lens[b] or where key_mask[b] is False are ignored; a query whose keys are all
    masked gets zeros. Returns [B, H, Lq, D] in q's dtype.
    """
    check_attention_inputs(q, k, v, kv_lens, key_mask)
    B, H, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    valid = key_validity(kv_lens, key_mask, B, k.shape[2], q.device)[:, None, None, :]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    # Masked cache slots may hold garbage (even NaN); zero them so 0 * NaN cannot leak into the output.
    values = v.float().masked_fill(~valid[:, :, 0, :, None], 0.0)
    out = torch.matmul(p, values) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.to(q.dtype)
