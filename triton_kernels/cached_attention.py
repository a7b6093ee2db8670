"""Attention of a short block of queries against a long cached K/V (flash-decoding).

With Lq <= 64 and Lk up to 16k the work per (batch, head) is a thin strip, so one program per head
would leave most of a GPU idle at batch 1. The keys are cut into splits: `_attn_split_kernel` writes,
per split, the running max, the softmax denominator and the unnormalised P @ V (fp32), and
`_attn_combine_kernel` rescales and sums the splits. Traffic is dominated by reading K and V once
(2 * B * H * Lk * D elements); the partials add 4 * splits * (D + 2) bytes per query row.
"""

import math

import torch
import triton
import triton.language as tl

from .reference import check_attention_inputs
from .remask_topk import require_kernel_device

_BLOCK_N = 64
_CPU_PROGRAMS = 8  # stands in for the SM count when the interpreter runs on CPU tensors


@triton.jit
def _attn_split_kernel(
    Q, K, V, KV_LENS, KEY_MASK, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mask_b,
    H, LQ, LK, SPLIT_SIZE, NUM_SPLITS, scale,
    HAS_KV_LENS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < LQ

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=rows[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh

    end = LK
    if HAS_KV_LENS:
        end = tl.minimum(tl.load(KV_LENS + b).to(tl.int32), LK)
    start = split * SPLIT_SIZE
    stop = tl.minimum(start + SPLIT_SIZE, end)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        keys = n0 + offs_n
        valid = keys < stop
        if HAS_KEY_MASK:
            valid &= tl.load(KEY_MASK + b * stride_mask_b + keys, mask=valid, other=0) != 0
        k = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=valid[None, :], other=0.0)
        if IEEE_DOT:  # fp32 inputs: full precision, not TF32
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no valid key yet keep m = -inf; subtracting 0 instead keeps exp() from giving NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # Masked slots are loaded as 0: cache slots may hold garbage, and 0 * NaN would poison acc.
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=valid[:, None], other=0.0)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    part = (bh * NUM_SPLITS + split).to(tl.int64) * LQ + offs_m
    tl.store(M_PART + part, m_i, mask=rows)
    tl.store(L_PART + part, l_i, mask=rows)
    tl.store(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rows[:, None])


@triton.jit
def _attn_combine_kernel(
    M_PART, L_PART, ACC_PART, OUT,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, NUM_SPLITS,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh = tl.program_id(0)
    row = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    splits = offs_s < NUM_SPLITS
    part = (bh * NUM_SPLITS + offs_s).to(tl.int64) * LQ + row

    m = tl.load(M_PART + part, mask=splits, other=float("-inf"))
    l = tl.load(L_PART + part, mask=splits, other=0.0)
    acc = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=splits[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    # Splits without a valid key have m = -inf and get weight 0; so does everything when no key is valid.
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)

    b = bh // H
    h = bh % H
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + row * stride_om + offs_d * stride_od,
             out.to(OUT.dtype.element_ty))


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def cached_attention(q, k, v, *, kv_lens=None, key_mask=None, scale=None):
    """Triton version of reference.cached_attention (same arguments, same results).

    q [B, H, Lq, D], k/v [B, H, Lk, D] (fp16/fp32, D in 16/32/64/128, any strides), kv_lens int [B],
    key_mask bool [B, Lk] (True = valid key). Returns [B, H, Lq, D] in q's dtype.
    """
    check_attention_inputs(q, k, v, kv_lens, key_mask)
    require_kernel_device(q, "q")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if B * H * Lq == 0:
        return out

    block_m = min(64, max(16, triton.next_power_of_2(Lq)))  # tl.dot needs >= 16 rows
    m_blocks = triton.cdiv(Lq, block_m)
    # Enough splits to give every SM about two programs, each split a whole number of key tiles.
    num_splits = min(triton.cdiv(Lk, _BLOCK_N),
                     max(1, triton.cdiv(_target_programs(q.device), B * H * m_blocks)))
    split_size = triton.cdiv(triton.cdiv(Lk, num_splits), _BLOCK_N) * _BLOCK_N
    num_splits = triton.cdiv(Lk, split_size)

    m_part = torch.empty((B * H, num_splits, Lq), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty((B * H, num_splits, Lq, D), dtype=torch.float32, device=q.device)
    # Absent optional inputs get a dummy pointer that the kernel never reads.
    lens = kv_lens.contiguous() if kv_lens is not None else m_part
    mask = key_mask.contiguous().view(torch.uint8) if key_mask is not None else m_part
    _attn_split_kernel[(num_splits, B * H, m_blocks)](
        q, k, v, lens, mask, m_part, l_part, acc_part,
        *q.stride(), *k.stride(), *v.stride(),
        mask.stride(0) if key_mask is not None else 0,
        H, Lq, Lk, split_size, num_splits, scale,
        HAS_KV_LENS=kv_lens is not None, HAS_KEY_MASK=key_mask is not None,
        IEEE_DOT=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, HEAD_DIM=D, num_warps=4, num_stages=2,
    )
    _attn_combine_kernel[(B * H, Lq)](
        m_part, l_part, acc_part, out, *out.stride(),
        H, Lq, num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=D, num_warps=4,
    )
    return out
