"""The refresh-interval cache (DESIGN §4): fixed K/V buffers of the whole sequence, written by full forwards;
and `NoCache`, the uncached loop, behind the same interface, so the loop never asks which it has.

Allocated once per batch as [n_layers, B, H, L, D]. A cached step passes the whole buffer and a `past_mask`
that hides the slots the queries stand for, so no step copies or grows the cache; the engine runners bind each
layer's slice `buffer[i]` (contiguous) to the graphs' per-layer cache tensors. Each layer starts on a 256-byte
boundary (layer_aligned), the alignment TensorRT requires of every address it is given. When to refresh is the
refresh policy's decision (refresh.py).
"""

from __future__ import annotations

import torch

from exporter.trt_plan import ALIGNMENT, aligned_empty

from ..backends.runner import Runner
from .refresh import RefreshPolicy, RowSignals, make_policy

DenoiserInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # embeds, positions, mask, index


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


class NoCache:
    """The uncached loop: every step is a full forward, whose keys and values are not kept."""

    def refreshes(self, signals: RowSignals) -> bool:
        return True

    def clear_rows(self, rows: list[int]) -> None:
        pass

    def regroup(self, keep: list[int], shape: tuple[int, ...]) -> None:
        pass

    def full_pass(self, runner: Runner, inputs: DenoiserInputs, rows: torch.Tensor | None) -> torch.Tensor:
        return runner.denoise_logits(*inputs)

    def full_pass_of_row(self, runner: Runner, inputs: DenoiserInputs, row: int, first: int) -> torch.Tensor:
        return runner.denoise_logits(*inputs)


class KVCache:
    """mode "prefix" (the cached pass runs the block and everything after it) or "dual" (the block alone)."""

    def __init__(self, mode: str, policy: RefreshPolicy, shape: tuple[int, int, int, int, int],
                 dtype: torch.dtype, device: torch.device):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"cache mode must be 'prefix' or 'dual', got {mode!r}")
        self.mode, self.policy = mode, policy
        self.keys = layer_aligned(shape, dtype, device)
        self.values = layer_aligned(shape, dtype, device)

    @property
    def length(self) -> int:
        return self.keys.shape[3]

    def refreshes(self, signals: RowSignals) -> bool:
        return self.policy.should_refresh(signals)

    # ---- rows ----------------------------------------------------------------------------------------

    def clear_rows(self, rows: list[int]) -> None:
        """New rows in these places: their slots start empty (and masked until their first full forward)."""
        for r in rows:
            self.keys[:, r].zero_()
            self.values[:, r].zero_()

    def regroup(self, keep: list[int], shape: tuple[int, ...]) -> None:
        """Rows `keep` first, in a batch left-padded anew to `shape`. Every row ends with the same answer span, so the
        kept rows' slots move together: their last `span` slots are copied (the new padding in front stays zeros,
        and masked)."""
        keys, values = self.keys, self.values
        self.keys, self.values = (layer_aligned(shape, keys.dtype, keys.device) for _ in range(2))
        span = min(keys.shape[3], shape[3])
        index = torch.tensor(keep, dtype=torch.int64, device=keys.device)
        for new, previous in ((self.keys, keys), (self.values, values)):
            new[:, :len(keep), :, -span:] = previous.index_select(1, index)[:, :, :, -span:]

    # ---- passes --------------------------------------------------------------------------------------

    def full_pass(self, runner: Runner, inputs: DenoiserInputs, rows: torch.Tensor | None) -> torch.Tensor:
        """The full forward over `rows` (None: every row, whose presents are written into the buffers in place);
        its keys and values refresh those rows' cache."""
        if rows is None:
            return runner.denoise_full(*inputs, self.keys, self.values)[0]
        logits, keys, values = runner.denoise_full(*inputs)
        self.keys.index_copy_(1, rows, keys)
        self.values.index_copy_(1, rows, values)
        return logits

    def full_pass_of_row(self, runner: Runner, inputs: DenoiserInputs, row: int, first: int) -> torch.Tensor:
        """The full forward of one row over its own span (slots from `first` on)."""
        logits, keys, values = runner.denoise_full(*inputs)
        self.keys[:, row, :, first:] = keys[:, 0]
        self.values[:, row, :, first:] = values[:, 0]
        return logits

    def cached_pass(self, runner: Runner, inputs: DenoiserInputs, rows: torch.Tensor | None, block_start: int,
                    block_end: int, with_keys: bool = False):
        """The block (dual) or the block and everything after it (prefix) against the cache of `rows` (None: every
        row); `inputs` cover the whole sequence. Returns the logits, and the queries' fresh keys [n_layers, b, H,
        Q, D] too with_keys."""
        end = self.query_end(block_end)
        embeds, positions, mask, logits_index = inputs
        past_keys, past_values = self.buffers(rows)
        return runner.denoise_cached(embeds[:, block_start:end], positions[:, block_start:end],
                                     mask[:, block_start:end], logits_index, past_keys, past_values,
                                     self.past_mask(mask, block_start, end), block_start, with_keys=with_keys)

    def block_keys(self, layers: slice, rows: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """A copy of the cached keys of slots [start, end) in `layers`, for `rows` (None: every row)."""
        keys = self.keys[layers] if rows is None else self.keys[layers].index_select(1, rows)
        return keys[:, :, :, start:end].clone()

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


def make_cache(cfg, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
               device: torch.device) -> NoCache | KVCache:
    """The cache a GenerationConfig asks for, with its refresh policy."""
    if cfg.cache == "none":
        return NoCache()
    return KVCache(cfg.cache, make_policy(cfg, shape[0]), shape, dtype, device)
