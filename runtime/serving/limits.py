"""What one request may cost, checked before the work it would cost: answer length, prompt characters, images,
decoded pixels per image and per padded square, decoded pixels in flight across the server, and requests in
progress.

The in-flight budget is taken before an image is decoded (its size is read from the header) and given back when
the request ends, so a crowd of requests with large images is refused with 503 instead of being decoded first.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from ..config import GenerationConfig
from .errors import APIError

MEGA = 10**6
# The serve command's option for each limit, named in the errors.
FLAGS = {"max_tokens": "--max-tokens-limit", "max_prompt_chars": "--max-prompt-chars", "max_images": "--max-images",
         "max_image_megapixels": "--max-image-megapixels", "max_megapixels_in_flight": "--max-megapixels-in-flight",
         "max_concurrent_requests": "--max-concurrent-requests", "request_timeout": "--request-timeout"}


@dataclass(frozen=True)
class ServerLimits:
    """max_tokens: the longest answer (gen_length, i.e. max_tokens rounded up to whole blocks); max_prompt_chars:
    characters of the prompt (all messages); max_images: images in one request; max_image_megapixels: one decoded
    image, and the square it is padded to when a request has several; max_megapixels_in_flight: decoded images of
    all requests being prepared, queued or run; max_concurrent_requests: requests in progress (read, waiting or
    running; /health and /metrics are never refused); request_timeout: seconds from arrival after which a request is stopped
    (None: never)."""

    max_tokens: int = 1024
    max_prompt_chars: int = 65536
    max_images: int = 8
    max_image_megapixels: float = 32
    max_megapixels_in_flight: float = 256
    max_concurrent_requests: int = 128
    request_timeout: float | None = 600

    def __post_init__(self):
        for name in ("max_tokens", "max_prompt_chars", "max_images", "max_concurrent_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({FLAGS[name]}) must be an integer >= 1, got {value!r}")
        for name in ("max_image_megapixels", "max_megapixels_in_flight", "request_timeout"):
            value = getattr(self, name)
            if value is None and name == "request_timeout":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{name} ({FLAGS[name]}) must be a number > 0, got {value!r}")
        if self.max_megapixels_in_flight < self.max_image_megapixels:
            raise ValueError(f"--max-megapixels-in-flight {self.max_megapixels_in_flight:g} is less than "
                             f"--max-image-megapixels {self.max_image_megapixels:g}: no image of the largest size "
                             f"could ever be decoded")

    def check_generation(self, config: GenerationConfig) -> None:
        if config.gen_length > self.max_tokens:
            raise APIError(400, f"the answer would take {config.gen_length} positions (max_tokens rounded up to "
                                f"whole blocks of {config.block_length}), more than this server's limit of "
                                f"{self.max_tokens} (--max-tokens-limit): ask for fewer tokens", "max_tokens",
                           "max_tokens_too_large")

    def check_prompt(self, characters: int, images: int) -> None:
        if characters > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {characters} characters, more than this server's limit of "
                                f"{self.max_prompt_chars} (--max-prompt-chars): shorten it", "messages",
                           "prompt_too_long")
        if images > self.max_images:
            raise APIError(400, f"the request has {images} images, more than this server's limit of "
                                f"{self.max_images} per request (--max-images): send fewer", "messages",
                           "too_many_images")

    def image_pixels(self, sizes: list[tuple[int, int]]) -> int:
        """The decoded pixels of a request's images, each checked against max_image_megapixels (and its padded
        square when there are several); 413 when one is larger."""
        limit = int(self.max_image_megapixels * MEGA)
        for i, (width, height) in enumerate(sizes):
            side = max(width, height)
            if width * height > limit:
                raise APIError(413, f"image {i + 1} has {width}x{height} = {width * height} pixels, more than this "
                                    f"server's limit of {limit} (--max-image-megapixels): downscale it (the model "
                                    f"sees at most 6x6 tiles of 384 pixels)", "messages", "image_too_large")
            if len(sizes) > 1 and side * side > limit:
                raise APIError(413, f"image {i + 1} ({width}x{height}) would be padded to a {side}x{side} square "
                                    f"({side * side} pixels), more than this server's limit of {limit} "
                                    f"(--max-image-megapixels): with several images in a request each is padded "
                                    f"to a square; crop or downscale it", "messages", "image_too_large")
        return sum(width * height for width, height in sizes)


class PixelBudget:
    """Decoded image pixels in flight across the server (any thread)."""

    def __init__(self, megapixels: float):
        self.capacity = int(megapixels * MEGA)
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> "Reservation":
        """The pixels taken until the Reservation is released; 413 when a request needs more than the whole
        budget, 503 (retry) when other requests hold too much of it now."""
        if pixels > self.capacity:
            raise APIError(413, f"the request's images have {pixels} pixels in all, more than this server's budget "
                                f"of {self.capacity} (--max-megapixels-in-flight): send fewer or smaller images",
                           "messages", "images_too_large")
        with self._lock:
            if self.used + pixels > self.capacity:
                raise APIError(503, f"the server is holding {self.used} decoded image pixels for other requests "
                                    f"and this request's {pixels} would exceed its budget of {self.capacity} "
                                    f"(--max-megapixels-in-flight): retry shortly", None, "image_budget_full",
                               {"Retry-After": "1"})
            self.used += pixels
        return Reservation(self, pixels)


class Reservation:
    def __init__(self, budget: PixelBudget, pixels: int):
        self.budget, self.pixels = budget, pixels
        self._released = False

    def release(self) -> None:
        """Give the pixels back (once; later calls do nothing)."""
        with self.budget._lock:
            if not self._released:
                self._released = True
                self.budget.used -= self.pixels


class ConcurrencyLimit:
    """Refuses a request beyond `limit` in progress with OpenAI's 503 JSON and Retry-After, before its body is read
    (uvicorn's limit_concurrency would also count idle and half-open connections, and answers in plain text).
    /health and /metrics are always answered, so a busy server is neither taken for a dead one nor unobserved."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ("/health", "/metrics"):
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            refusal = APIError(503, f"the server is handling {self.active} requests, its limit "
                                    f"(--max-concurrent-requests): retry shortly", None, "server_busy",
                               {"Retry-After": "1"})
            return await refusal.response()(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
