"""ImageEmbeddingCache: projected image embeddings kept in an LRU with a byte budget, so the next question
about an image it has seen (a chat's next turn, many users asking about one picture) skips preprocessing,
the vision tower and the projector.

Keyed by the decoded image (mode, size and pixels after EXIF orientation) and how it is tiled, never by a
file name or the encoded bytes: the same picture sent as PNG and as a path is one entry, and an edited file
under the same name is another. Exact: a hit returns the tensor the miss computed.
"""

from __future__ import annotations

import hashlib

import torch
from PIL import Image


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"the image cache's budget must be a number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        import cachetools  # here, not at import: the library (and benchmarks.gpu_check) must load without it

        self._entries = cachetools.LRUCache(maxsize=max_bytes, getsizeof=lambda t: t.numel() * t.element_size())
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: Image.Image, aspect: str) -> bytes:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{aspect}|{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
        if image.mode == "P":  # the same indices under another palette are another picture
            digest.update(bytes(image.getpalette() or ()))
        return digest.digest()

    def get(self, key: bytes) -> torch.Tensor | None:
        embeddings = self._entries.get(key)
        if embeddings is None:
            self.misses += 1
        else:
            self.hits += 1
        return embeddings

    def put(self, key: bytes, embeddings: torch.Tensor) -> None:
        if embeddings.numel() * embeddings.element_size() <= self.max_bytes:  # larger than the budget: not kept
            self._entries[key] = embeddings

    @property
    def bytes_used(self) -> int:
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)
