"""Fused confidence remasking: one pass over each position's logits gives x0 and its confidence.

Memory traffic per vocab entry of the reference at temperature 0 with banned ids, fp16 logits:
  logits.float()        read 2 B, write 4 B
  masked_fill (bans)    read 4 B + 1 B of mask, write 4 B
  argmax                read 4 B
  softmax               read 4 B (max and sum passes may hit cache), write 4 B
about 27 B per entry against 2 B for the kernel, which reads the logits once (plus 4 B of noise when
temperature > 0) and writes 16 B per position. It is bandwidth-bound, so expect ~10x at large V.
The confidence is float32 (the reference takes it in float64, as the official loop does); positions are
ranked by its complement, summed from the other entries, which float32 holds to ~1e-6 relative for any
confidence, so the order is the float64 order except between complements that agree to ~6 digits.
"""

import os

import torch
import triton
import triton.language as tl

from .reference import banned_vocab_mask, check_remask_inputs, gumbel_noise, select_commit

_BLOCK_V = 4096


@triton.jit
def _remask_vocab_kernel(
    LOGITS, NOISE, BANNED, ELIGIBLE, X0, CONF, COMPLEMENT,
    stride_b, stride_l, stride_v,
    L, V,
    HAS_NOISE: tl.constexpr, HAS_BANS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per (row, position): argmax of the noisy logits and online softmax of the clean ones.
    # The softmax sum is kept in two parts per lane, the entries equal to the running maximum (counted) and
    # those below it (summed), so that the complement 1 - p of a maximum is summed from the other entries
    # instead of computed as 1 - p, which float32 rounds to 0 once p is within ~3e-8 of 1.
    # The argmax and both sums are per lane and reduced once after the loop, so a tile costs a single
    # cross-warp reduction (its max).
    pid = tl.program_id(0)
    row_ptr = LOGITS + (pid // L).to(tl.int64) * stride_b + (pid % L) * stride_l
    eligible = tl.load(ELIGIBLE + pid) != 0
    lanes = tl.arange(0, BLOCK_V)

    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per lane: noisy max so far
    best_idx = lanes                                        # per lane: its vocab index
    run_max = tl.full((), float("-inf"), tl.float32)        # max of the clean logits so far
    ties = tl.zeros((BLOCK_V,), tl.float32)                 # per lane: entries equal to run_max
    below = tl.zeros((BLOCK_V,), tl.float32)                # per lane: sum of exp(clean - run_max) under it
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        in_vocab = offs < V
        x = tl.load(row_ptr + offs * stride_v, mask=in_vocab, other=float("-inf")).to(tl.float32)
        if HAS_BANS:
            banned = tl.load(BANNED + offs, mask=in_vocab, other=0) != 0
            x = tl.where(banned & eligible, float("-inf"), x)
        y = x
        if HAS_NOISE:
            y = x + tl.load(NOISE + pid.to(tl.int64) * V + offs, mask=in_vocab, other=0.0)

        # Strictly greater: a lane sees increasing indices, so it keeps the first of equal maxima.
        improved = y > best
        best = tl.where(improved, y, best)
        best_idx = tl.where(improved, offs, best_idx)

        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        # Keep exp() finite while every logit seen so far is -inf.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        # A new maximum: the entries at the old one (and those under it) are now below, rescaled.
        grew = new_max > run_max
        below = tl.where(grew, (below + ties) * tl.exp(run_max - safe_max), below)
        ties = tl.where(grew, 0.0, ties)
        at_max = x == new_max
        ties += tl.where(at_max, 1.0, 0.0)
        below += tl.where(at_max, 0.0, tl.exp(x - safe_max))
        run_max = new_max

    top = tl.max(best, axis=0)
    x0 = tl.min(tl.where(best == top, best_idx, V), axis=0)  # lowest index among equal maxima
    clean = tl.load(row_ptr + x0 * stride_v).to(tl.float32)
    if HAS_BANS:
        clean = tl.where(eligible & (tl.load(BANNED + x0) != 0), float("-inf"), clean)
    all_ties = tl.sum(ties, axis=0)
    all_below = tl.sum(below, axis=0)
    total = all_ties + all_below
    picked = tl.exp(clean - run_max)
    # x0 at the maximum: the others are the other ties and everything below. Otherwise p <= 1/2 and
    # total - picked loses nothing.
    others = tl.where(clean == run_max, (all_ties - 1.0) + all_below, total - picked)
    tl.store(X0 + pid, x0.to(tl.int64))
    tl.store(CONF + pid, tl.where(eligible, picked / total, float("-inf")))
    tl.store(COMPLEMENT + pid, tl.where(eligible, others / total, float("inf")))


def require_kernel_device(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                         "set before import); use triton_kernels.remask / triton_kernels.reference on CPU")


def remask_topk(logits, eligible, k, *, temperature=0.0, banned_ids=None, threshold=None, generator=None):
    """Triton version of reference.remask_topk (same arguments, same results).

    logits [B, L, V] fp16/fp32, eligible bool [B, L], k int64 [B].
    Returns x0 int64 [B, L], confidence float32 [B, L] (-inf where not eligible), commit bool [B, L].
    """
    check_remask_inputs(logits, eligible, k, temperature, banned_ids, threshold, generator)
    require_kernel_device(logits, "logits")
    B, L, V = logits.shape
    x0 = torch.empty((B, L), dtype=torch.int64, device=logits.device)
    confidence = torch.empty((B, L), dtype=torch.float32, device=logits.device)
    complement = torch.empty_like(confidence)
    if B * L == 0:
        return x0, confidence, torch.zeros((B, L), dtype=torch.bool, device=logits.device)

    noise = gumbel_noise(logits.shape, temperature, generator, logits.device)
    banned = banned_vocab_mask(banned_ids, V, logits.device)
    # Bool tensors are passed as uint8 views of the same bytes; absent inputs get a dummy pointer that
    # the kernel never reads (HAS_NOISE / HAS_BANS are False).
    eligible_u8 = eligible.contiguous().view(torch.uint8)
    _remask_vocab_kernel[(B * L,)](
        logits,
        noise if noise is not None else x0,
        banned.view(torch.uint8) if banned is not None else eligible_u8,
        eligible_u8, x0, confidence, complement,
        logits.stride(0), logits.stride(1), logits.stride(2),
        L, V,
        HAS_NOISE=noise is not None, HAS_BANS=banned is not None,
        BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)), num_warps=8,
    )
    above = None if threshold is None else confidence > threshold
    return x0, confidence, select_commit(complement, eligible, k, above)
