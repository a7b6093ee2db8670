"""The runner contract: one object per backend that runs the model's parts on torch tensors.

Like Polygraphy's BaseRunner, the public methods here do the shared work (activation, input checks, and
splitting a call larger than the engines take into calls that fit) and call the backend's `_*_impl`
methods. Shapes and names follow docs/engines.md; all tensors live on `runner.device`, so a GPU backend
never round-trips through the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from exporter.engines_format import EngineLimits
from llada_v import LladaVConfig


class Runner(ABC):
    """Base class. Subclasses set the attributes below in `_activate_impl` and implement the `_*_impl` methods.

    config: the checkpoint's LladaVConfig; folder: where its tokenizer files are; dtype: the engines'
    float dtype (embeddings, features, K/V); device; max_sequence_length; embed_table [V, C] and
    image_newline [C] (None for a text-only model); loop_threads: torch threads for the loop's own
    small ops between engine calls, or None to leave torch's setting alone; limits: what one call of the
    engines may take (None: any size), and max_tiles: tiles per vision call (None: any number). Calls with
    more rows or tiles are split into calls that fit, whatever the backend.
    """

    name = "runner"

    def __init__(self):
        self.is_active = False
        self.config: LladaVConfig | None = None
        self.folder: Path | None = None
        self.dtype: torch.dtype | None = None
        self.device = torch.device("cpu")
        self.max_sequence_length = 0
        self.embed_table: torch.Tensor | None = None
        self.image_newline: torch.Tensor | None = None
        self.loop_threads: int | None = None
        self.limits: EngineLimits | None = None
        self.max_tiles: int | None = None

    @property
    def full_pass_per_row(self) -> bool:
        """Whether the loop runs a batch's full passes one row at a time, each over its own unpadded span. On
        a CPU a batched full pass costs as much per row as one alone and pays for every row's left padding on
        top; a GPU gains from the larger batch (README, Measured choices)."""
        return self.device.type == "cpu"

    # ---- lifecycle ------------------------------------------------------------------------------

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    # ---- the parts --------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [...] -> embeddings [..., C] in the runner's dtype (int8/int4 engines store the table in fp16)."""
        self._check_active("embed")
        self._check("ids", ids, torch.int64)
        return F.embedding(ids, self.embed_table).to(self.dtype)

    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float32 [N, 3, S, S] -> features [N, T, Cv]."""
        self._check_active("vision")
        if self.config.vision is None:
            raise ValueError(f"{self.name} | this model is text-only: it has no vision tower")
        size = self.config.vision.image_size
        self._check("pixel_values", pixel_values, torch.float32, (None, self.config.vision.num_channels, size, size))
        with on_device(self.device):
            return joined([self._vision_impl(chunk) for chunk in self._tile_chunks(pixel_values)])

    def projector(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, T, Cv] -> embeddings [N, T, C]."""
        self._check_active("projector")
        v = self.config.vision
        self._check("features", features, self.dtype, (None, v.tokens_per_tile, v.hidden_size))
        with on_device(self.device):
            return joined([self._projector_impl(chunk) for chunk in self._tile_chunks(features)])

    def _tile_chunks(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tiles,) if self.max_tiles is None else tiles.split(self.max_tiles)

    def _row_chunks(self, rows: int) -> list[slice]:
        """The rows of one call in pieces the engines take (max_batch rows each)."""
        step = rows if self.limits is None else self.limits.max_batch
        return [slice(start, start + step) for start in range(0, rows, step)]

    def denoise_full(self, inputs_embeds, position_ids, attention_mask, logits_index,
                     present_keys=None, present_values=None):
        """The full pass: logits float32 [B, P, V], present_keys, present_values [n_layers, B, H, L, D].

        present_keys/present_values: buffers of that shape (a KV cache's), each layer contiguous, to write the
        presents into, or None for new ones; either way they are what is returned.
        """
        self._check_active("denoise_full")
        b, length = self._check_denoiser_inputs(inputs_embeds, position_ids, attention_mask, logits_index)
        self._check_limit("sequence", length, "max_sequence", "prompt + answer positions", "--max-sequence")
        lm = self.config.language
        kv_shape = (lm.num_hidden_layers, b, lm.num_attention_heads, length, lm.head_dim)
        presents = []
        for name, buffer in (("present_keys", present_keys), ("present_values", present_values)):
            if buffer is None:
                buffer = torch.empty(kv_shape, dtype=self.dtype, device=self.device)
            self._check(name, buffer, self.dtype, kv_shape)
            if not all(layer.is_contiguous() for layer in buffer):
                raise ValueError(f"{self.name} | {name}: each layer of the buffer must be contiguous (it is written "
                                 f"by pointer)")
            presents.append(buffer)
        inputs = (inputs_embeds, position_ids, attention_mask, logits_index)
        logits = joined([self._denoise_full_impl(*(t[rows] for t in inputs), *(p[:, rows] for p in presents))
                         for rows in self._row_chunks(b)])
        return logits, *presents

    def denoise_logits(self, inputs_embeds, position_ids, attention_mask, logits_index) -> torch.Tensor:
        """The full pass's logits alone, for a loop without a cache. A backend that can skip writing the
        presents (a copy of every layer's K/V per step) overrides `_denoise_logits_impl`."""
        self._check_active("denoise_logits")
        b, length = self._check_denoiser_inputs(inputs_embeds, position_ids, attention_mask, logits_index)
        self._check_limit("sequence", length, "max_sequence", "prompt + answer positions", "--max-sequence")
        inputs = (inputs_embeds, position_ids, attention_mask, logits_index)
        return joined([self._denoise_logits_impl(*(t[rows] for t in inputs)) for rows in self._row_chunks(b)])

    def _denoise_logits_impl(self, inputs_embeds, position_ids, attention_mask, logits_index) -> torch.Tensor:
        return self.denoise_full(inputs_embeds, position_ids, attention_mask, logits_index)[0]

    def denoise_cached(self, inputs_embeds, position_ids, attention_mask, logits_index,
                       past_keys, past_values, past_mask, query_start: int, *, with_keys: bool = False):
        """The cached pass: the Q queries attend to `past_*` where `past_mask` is 1 and to their own
        fresh keys/values. Returns logits float32 [B, P, V], and with_keys the queries' fresh keys
        [n_layers, B, H, Q, D] too (the graph's presents; what a drift-based refresh policy reads).

        The queries sit at slots [query_start, query_start + Q) of the cache, which `past_mask` hides;
        a runner may overwrite those slots of past_keys/past_values with the queries' fresh K/V.
        """
        self._check_active("denoise_cached")
        b, q = self._check_denoiser_inputs(inputs_embeds, position_ids, attention_mask, logits_index)
        lm = self.config.language
        cache_shape = (lm.num_hidden_layers, b, lm.num_attention_heads, None, lm.head_dim)
        self._check("past_keys", past_keys, self.dtype, cache_shape)
        self._check("past_values", past_values, self.dtype, tuple(past_keys.shape))
        self._check("past_mask", past_mask, torch.int64, (b, past_keys.shape[3]))
        if not 0 <= query_start <= past_keys.shape[3] - q:
            raise ValueError(f"{self.name} | query_start {query_start} puts {q} queries outside the "
                             f"cache of length {past_keys.shape[3]}")
        self._check_limit("queries", q, "max_gen_length", "queries of a cached pass (the prefix cache runs the block "
                          "and the answer after it)", "--max-gen-length")
        self._check_limit("past_sequence", past_keys.shape[3], "max_sequence", "cache slots", "--max-sequence")
        inputs = (inputs_embeds, position_ids, attention_mask, logits_index)
        pieces = [self._denoise_cached_impl(*(t[rows] for t in inputs), past_keys[:, rows], past_values[:, rows],
                                            past_mask[rows], query_start, with_keys)
                  for rows in self._row_chunks(b)]
        if not with_keys:
            return joined(pieces)
        keys = joined([keys.transpose(0, 1) for _, keys in pieces]).transpose(0, 1)  # the chunks are rows: dim 1
        return joined([logits for logits, _ in pieces]), keys

    # ---- checks -----------------------------------------------------------------------------------

    def _check_active(self, method: str) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self.name} | must be activated before calling {method}()")

    def _check(self, name: str, tensor, dtype: torch.dtype, shape: tuple | None = None) -> None:
        """dtype, device and shape (None = any size) of one input."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{self.name} | {name}: expected a torch tensor, got {type(tensor).__name__}")
        ok = tensor.dtype == dtype and tensor.device == self.device
        if shape is not None:
            ok = ok and tensor.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, tensor.shape))
        if not ok:
            expected = "any" if shape is None else [("?" if e is None else e) for e in shape]
            raise ValueError(f"{self.name} | {name}: received {dtype_shape(tensor)} on {tensor.device}. "
                             f"Note: expected {str(dtype).replace('torch.', '')} {expected} on {self.device}")

    def _check_denoiser_inputs(self, inputs_embeds, position_ids, attention_mask, logits_index) -> tuple[int, int]:
        self._check("inputs_embeds", inputs_embeds, self.dtype, (None, None, self.config.language.hidden_size))
        b, q = inputs_embeds.shape[:2]
        self._check("position_ids", position_ids, torch.int64, (b, q))
        self._check("attention_mask", attention_mask, torch.int64, (b, q))
        self._check("logits_index", logits_index, torch.int64, (b, None))
        self._check_limit("logits rows", logits_index.shape[1], "max_block", "logits rows (the block being decoded)",
                          "--max-block")
        return b, q

    def _check_limit(self, what: str, size: int, limit: str, meaning: str, flag: str) -> None:
        allowed = None if self.limits is None else getattr(self.limits, limit)
        if allowed is not None and size > allowed:
            raise ValueError(f"{self.name} | {size} {what} in one call, more than these engines take ({allowed} "
                             f"{meaning}): rebuild them with a larger {flag}")

    # ---- backend API ------------------------------------------------------------------------------

    @abstractmethod
    def _activate_impl(self) -> None:
        ...

    @abstractmethod
    def _deactivate_impl(self) -> None:
        ...

    def _vision_impl(self, pixel_values):
        raise ValueError(f"{self.name} runner has no vision part: this model is text-only")

    def _projector_impl(self, features):
        raise ValueError(f"{self.name} runner has no projector: this model is text-only")

    @abstractmethod
    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        """Returns the logits; writes the presents into the given [n_layers, B, H, L, D] buffers."""
        ...

    @abstractmethod
    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start, with_keys):
        """Returns the logits, or (logits, the queries' fresh keys [n_layers, B, H, Q, D]) with_keys."""
        ...


def joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The outputs of a call split into pieces, as one tensor (the one piece itself when there is one)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def per_layer(name: str, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """The graphs' per-layer cache tensors (`past_keys.0`, ...) as views of a stacked [n_layers, ...] tensor (a
    layer that is not contiguous is copied: never the case for the presents, which Runner.denoise_full checks)."""
    return {f"{name}.{i}": layer.contiguous() for i, layer in enumerate(stacked)}


def empty_cache(like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The denoiser graph's cache inputs for a full pass: every layer's past keys/values [B, H, 0, D] and
    past_mask [B, 0], of the dtype and device of `like` (a stacked [n_layers, B, H, L, D] cache)."""
    n, b, h, _, d = like.shape
    empty = like.new_empty((n, b, h, 0, d))
    return {**per_layer("past_keys", empty), **per_layer("past_values", empty),
            "past_mask": torch.zeros((b, 0), dtype=torch.int64, device=like.device)}


def dtype_shape(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)}"


def on_device(device: torch.device):
    """A block in which `device` is CUDA's current device (Triton launches and TensorRT run there), or nothing
    for the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def resolve_device(device: str | torch.device, backend: str) -> torch.device:
    """A torch device the backend can use; ValueError when a GPU is asked for and torch has none."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend {backend!r} runs on 'cpu' or 'cuda', not {device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"backend {backend!r} on {device} needs an NVIDIA GPU and a CUDA build of torch, "
                             f"but torch.cuda.is_available() is False here: use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
