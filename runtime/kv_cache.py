"""The refresh-interval cache (DESIGN §4): fixed K/V buffers of the whole sequence, written by full forwards.

Allocated once per generate call as [n_layers, B, H, L, D]. A cached step passes the whole buffer and a
`past_mask` that hides the slots the queries stand for, so no step copies or grows the cache; the engine
runners bind each layer's slice `buffer[i]` (contiguous) to the graphs' per-layer cache tensors. Each layer
starts on a 256-byte boundary (layer_aligned), the alignment TensorRT requires of every address it is given.
"""

from __future__ import annotations

import torch

from exporter.trt_plan import ALIGNMENT, aligned_empty

def layer_aligned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros of `shape` [n_layers, ...] whose every layer is contiguous and starts on a 256-byte boundary (the
    storage is aligned, and each layer's stride rounded up to it)."""
    layer = 1
    for extent in shape[1:]:
        layer *= extent
    per_alignment = max(ALIGNMENT // torch.empty(0, dtype=dtype).element_size(), 1)
    stride = -(-layer // per_alignment) * per_alignment
    storage = aligned_empty((shape[0] * stride,), dtype, device, zero=True)
    inner = [1]
    for extent in reversed(shape[2:]):
        inner.insert(0, inner[0] * extent)
    return storage.as_strided(shape, (stride, *inner))


class KVCache:
    def __init__(self, mode: str, refresh_interval: int, shape: tuple[int, int, int, int, int],
                 dtype: torch.dtype, device: torch.device):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode must be 'prefix' or 'dual', got {mode!r}")
        self.mode = mode
        self.refresh_interval = refresh_interval
        self.keys = layer_aligned(shape, dtype, device)
        self.values = layer_aligned(shape, dtype, device)

    @property
    def length(self) -> int:
        return self.keys.shape[3]

    def should_refresh(self, step_in_block: int) -> bool:
        """At the start of every block (step 0) and at every multiple of the refresh interval."""
        return step_in_block % self.refresh_interval == 0

    def update(self, present_keys: torch.Tensor, present_values: torch.Tensor, rows: torch.Tensor):
        """Copy the presents [n_layers, b, H, L, D] of a full forward over some rows into those rows (a full
        forward over every row is given the buffers themselves to write)."""
        self.keys.index_copy_(1, rows, present_keys)
        self.values.index_copy_(1, rows, present_values)

    def buffers(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.keys, self.values
        return self.keys.index_select(1, rows), self.values.index_select(1, rows)

    def query_end(self, block_end: int) -> int:
        """End of the query span that starts at the current block: the block (dual), or everything after (prefix)."""
        return block_end if self.mode == "dual" else self.length

    def past_mask(self, attention_mask: torch.Tensor, query_start: int, query_end: int) -> torch.Tensor:
        """attention_mask [b, L] with the query slots hidden: int64 [b, L], 1 = read from the cache."""
        mask = attention_mask.clone()
        mask[:, query_start:query_end] = 0
        return mask
