"""Triton kernels for the diffusion loop's hot spots, with plain-PyTorch references.

The runtime calls `remask` and `attention`: they run the Triton launchers on CUDA tensors and the
references otherwise. On CPU the Triton path can be forced through the interpreter by setting both
TRITON_INTERPRET=1 (before this package is imported) and TRITON_KERNELS_FORCE=1 (slow; for tests); on CUDA
TRITON_KERNELS_DISABLE=1 runs the references instead (to compare, or to rule the kernels out).
Nothing here touches a device at import time.
"""

import os

from . import reference
from .cached_attention import cached_attention
from .remask_topk import remask_topk

__all__ = ["remask_topk", "cached_attention", "reference", "remask", "attention"]


def _use_triton(t) -> bool:
    if getattr(t, "is_cuda", False):
        return os.environ.get("TRITON_KERNELS_DISABLE") != "1"
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("TRITON_KERNELS_FORCE") == "1"


def remask(logits, eligible, k, *, temperature=0.0, banned_ids=None, threshold=None, generator=None):
    """remask_topk on the Triton path for CUDA tensors, the reference otherwise (same signature)."""
    impl = remask_topk if _use_triton(logits) else reference.remask_topk
    return impl(logits, eligible, k, temperature=temperature, banned_ids=banned_ids, threshold=threshold,
                generator=generator)


def attention(q, k, v, *, kv_lens=None, key_mask=None, scale=None):
    """cached_attention on the Triton path for CUDA tensors, the reference otherwise (same signature)."""
    impl = cached_attention if _use_triton(q) else reference.cached_attention
    return impl(q, k, v, kv_lens=kv_lens, key_mask=key_mask, scale=scale)
