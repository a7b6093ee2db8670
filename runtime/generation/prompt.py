"""From a request (prompt or conversation, images) to prompt embeddings: LLaDA-V's conversation format,
image tiles through the vision and projector parts, and splicing at the `<image>` positions."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
import torch
from PIL import Image

from llada_v import IMAGE_TOKEN_INDEX, conversation_ids
from llada_v.image_processing import check_padded_square, load_image, merge_tile_embeddings, tiles_of
from llada_v.tokenizer import chat_ids, place_images, plain_ids

from ..backends.runner import Runner
from .family import FamilyRules
from .image_cache import ImageEmbeddingCache

ImageLike = Union[str, Path, bytes, BinaryIO, Image.Image, np.ndarray]
SINGLE_IMAGE = (str, Path, bytes, bytearray, Image.Image, np.ndarray)
ROLES = ("system", "user", "assistant")
NO_VISION = "this model has no vision tower (it is a text-only model): it cannot take images"


@dataclass(frozen=True)
class Request:
    """One generation: a user prompt (or a whole conversation ending with a user turn) and its images.

    prompt: text, or a conversation: a list of messages [{"role": "user"|"assistant"|"system", "content": str}].
    image: one image (a path, encoded bytes, a binary file, a PIL image or an RGB uint8 array), a sequence
    or iterable of them, or None; read once, when the request is made (`images`). Each `<image>` in the
    prompt takes the next image; with no `<image>` at all, the placeholders go before the (last) user
    question, joined by spaces and followed by a newline, as the official evaluation writes them.
    plain: the prompt is a text taken as it is, without the chat template (a completion: BOS, then its tokens);
    it takes no images.
    """

    prompt: str | Sequence[dict]
    image: ImageLike | Sequence[ImageLike] | None = None
    plain: bool = False

    def __post_init__(self):
        object.__setattr__(self, "images", image_list(self.image))
        if self.plain and (not isinstance(self.prompt, str) or self.images):
            raise ValueError("a plain prompt is one text without images (a conversation or images need the chat "
                             "template: plain=False)")
        if not isinstance(self.prompt, (str, list, tuple)):
            raise ValueError(f"a prompt must be text or a conversation (a list of {{'role', 'content'}} messages), "
                             f"got {type(self.prompt).__name__}")
        texts = [self.prompt] if isinstance(self.prompt, str) else \
            [m.get("content") for m in self.prompt if isinstance(m, dict)]
        if any(isinstance(text, str) and not is_encodable(text) for text in texts):
            raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate): "
                             "decode it with errors='replace' first")

    def turns(self) -> list[dict]:
        """The conversation as written (a text is one user turn); ValueError when it is not one."""
        if isinstance(self.prompt, str):
            messages = [{"role": "user", "content": self.prompt}]
        else:
            messages = [dict(m) if isinstance(m, dict) else m for m in self.prompt]
            if not messages or any(not isinstance(m, dict) or not isinstance(m.get("content"), str)
                                   or m.get("role") not in ROLES for m in messages):
                raise ValueError("a conversation must be a non-empty list of {'role': 'system'|'user'|'assistant', "
                                 "'content': str} messages")
            if messages[-1]["role"] != "user":
                raise ValueError(f"a conversation must end with a user turn, not {messages[-1]['role']!r}")
        return messages

    def messages(self) -> list[dict]:
        """The conversation with one `<image>` per image; ValueError when they cannot be matched."""
        messages = self.turns()
        texts = place_images([m["content"] for m in messages], len(self.images), "the prompt")
        return [{**m, "content": text} for m, text in zip(messages, texts)]


def image_list(image) -> tuple:
    """A request's images as a tuple, each binary file read into bytes (iterables and files are read once)."""
    if image is None:
        return ()
    if isinstance(image, SINGLE_IMAGE) or hasattr(image, "read"):
        image = [image]
    elif not isinstance(image, Iterable):
        raise ValueError(f"an image must be a path, encoded bytes, a binary file, a PIL image or an RGB uint8 array "
                         f"(or a sequence of them), got {type(image).__name__}")
    images = []
    for item in image:
        if hasattr(item, "read"):
            if isinstance(item, io.TextIOBase):
                raise ValueError("an image file must be opened in binary mode ('rb'), not as text")
            item = item.read()
        images.append(item)
    return tuple(images)


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_conversation(prompt) -> bool:
    """A list of message dicts is one conversation, not a batch of requests."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def as_request(item) -> Request:
    if isinstance(item, Request):
        return item
    if isinstance(item, str):
        return Request(item)
    if isinstance(item, tuple) and len(item) == 2:
        return Request(*item)
    raise ValueError(f"a request must be a prompt string, a (prompt, image) tuple or a Request, got {type(item).__name__}")


@dataclass(frozen=True)
class PreparedRequest:
    """A request made ready for the engines: its prompt ids (IMAGE_TOKEN_INDEX where an image goes) and its images
    decoded upright. Preparing is the CPU work before the engines (tokenizing, decoding), so a server can do it
    on the requests' own threads and leave the engines' thread to the engines."""

    ids: list[int]
    images: tuple[Image.Image, ...]

    @property
    def aspect(self) -> str:
        """One image is tiled (anyres); each of several is padded to one square view, as the official evaluation
        does (llava_onevision_llada.py:466-468)."""
        return "pad" if len(self.images) > 1 else "anyres"


def prepare(request: Request, tokenizer, rules: FamilyRules, has_vision: bool) -> PreparedRequest:
    """The request's ids and decoded images; ValueError for a bad request, an unreadable or too large image
    (padded squares included) or images for a text-only model."""
    if request.images and not has_vision:
        raise ValueError(NO_VISION)
    ids = request_ids(request, tokenizer, rules)
    images = tuple(load_image(image) for image in request.images)
    if len(images) > 1:
        for i, image in enumerate(images):
            check_padded_square(image.size, f"image {i + 1}")
    return PreparedRequest(ids, images)


def image_embeddings(requests: list[PreparedRequest], runner: Runner, timer,
                     cache: ImageEmbeddingCache | None = None) -> list[list[torch.Tensor]]:
    """Per request, each image's merged embeddings [M, C] (global view, then the unpadded grid with
    image_newline ending every row), tiled in the request's aspect. The images not in `cache` go through one
    vision and one projector call (each distinct image once) and are added to it."""
    with timer("preprocess"):
        slots, todo = [], {}  # per request the key of each image; key -> (image, aspect) to encode
        found: dict = {}
        for request in requests:
            aspect = request.aspect
            keys = []
            for image in request.images:
                key = len(todo) if cache is None else cache.key(image, aspect)  # without a cache each image is new
                keys.append(key)
                if key in todo or key in found:
                    continue
                embeddings = None if cache is None else cache.get(key)
                if embeddings is None:
                    todo[key] = (image, aspect)
                else:
                    found[key] = embeddings
            slots.append(keys)
        tiles = {key: tiles_of(image, runner.config, aspect) for key, (image, aspect) in todo.items()}
    if tiles:
        pixel_values = torch.cat([t.pixel_values for t in tiles.values()]).to(runner.device)
        with timer("vision"):
            features = runner.vision(pixel_values)
        with timer("projector"):
            embeddings = runner.projector(features)
        pieces = embeddings.split([len(t.pixel_values) for t in tiles.values()])
        for (key, t), piece in zip(tiles.items(), pieces):
            found[key] = merge_tile_embeddings(piece, t, runner.image_newline, runner.config)
            if cache is not None:
                cache.put(key, found[key].clone())  # a padded view alone is a view of the whole output
    return [[found[key] for key in keys] for keys in slots]


def prompt_embeddings(ids: list[int], images: list[torch.Tensor], runner: Runner) -> torch.Tensor:
    """Token ids with IMAGE_TOKEN_INDEX markers -> [Lp, C]: text embedded, each marker replaced by its image."""
    pieces, chunk, images = [], [], iter(images)
    for token in ids + [None]:
        if token == IMAGE_TOKEN_INDEX or token is None:
            if chunk:
                pieces.append(runner.embed(torch.tensor(chunk, dtype=torch.int64, device=runner.device)))
                chunk = []
            if token is not None:
                pieces.append(next(images).to(runner.dtype))
        else:
            chunk.append(token)
    return torch.cat(pieces)


def request_ids(request: Request, tokenizer, rules: FamilyRules | None = None) -> list[int]:
    """The prompt ids in the family's format (FamilyRules.family; default LLaDA-V's)."""
    if rules is None or rules.image_placeholders:
        return plain_ids(tokenizer, request.prompt) if request.plain else conversation_ids(tokenizer, request.messages())
    if not request.plain:
        return chat_ids(tokenizer, request.turns())
    # LLaDA's generate.py tokenises the Base model's prompt as it is: tokenizer(prompt, add_special_tokens=False)
    ids = tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty: a plain prompt needs some text to continue")
    return ids
