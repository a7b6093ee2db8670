"""From an OpenAI request body to what a Request is made of: the conversation's messages (or a plain prompt) and
its images, read as encoded bytes, measured from their headers, and decoded only after the limits allow them."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from llada_v.image_processing import ImageTooLargeError, load_image
from llada_v.tokenizer import place_images

from ..generation.prompt import NO_VISION, Request, is_encodable
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest

MAX_PATH_CHARS = 4096


def conversation(body: ChatCompletionRequest, has_vision: bool = True,
                 image_placeholders: bool = True) -> tuple[list[dict], list[str]]:
    """The messages as a conversation with `<image>` placeholders, and the image URLs in order.

    A message's image parts go before its text, as LLaDA-V was trained ("<image>\\nquestion"), whatever
    their order among the parts, unless the text places them with `<image>` itself. A model without vision refuses
    image parts; in a family without placeholders (the text-only LLaDA models) `<image>` is text.
    """
    messages, urls = [], []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts, message_urls = [], []
        for j, part in enumerate(message.content):
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, "a text part needs its text", f"messages[{i}].content[{j}].text")
                texts.append(part.text)
            else:
                if part.image_url is None:
                    raise APIError(400, "an image_url part needs its image_url", f"messages[{i}].content[{j}]")
                if not has_vision:
                    raise APIError(400, NO_VISION, f"messages[{i}].content[{j}]", "model_has_no_vision")
                message_urls.append(part.image_url.url)
        if message_urls and message.role != "user":
            raise APIError(400, "only user messages can hold images", f"messages[{i}].content")
        if not image_placeholders:
            messages.append({"role": message.role, "content": "\n".join(texts)})
            continue
        try:
            text, = place_images(["\n".join(texts)], len(message_urls), f"messages[{i}]")
        except ValueError as err:
            raise APIError(400, str(err), f"messages[{i}].content") from err
        messages.append({"role": message.role, "content": text})
        urls += message_urls
    return messages, urls


def plain_prompt(body: CompletionRequest) -> str:
    """The one prompt of a completion request."""
    if body.echo:
        raise APIError(400, "echo is not supported: the answer is returned without the prompt", "echo", "unsupported")
    if body.logprobs is not None:
        raise APIError(400, "logprobs are not available: a diffusion model does not decode its answer left to right "
                            "token by token", "logprobs", "unsupported")
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise APIError(400, f"prompt must be one text (or a list of one), got a list of {len(body.prompt)}: send "
                            f"one request per prompt", "prompt", "unsupported")
    return body.prompt[0]


def chat_request(messages: list[dict], images: list, image_placeholders: bool = True) -> Request:
    """The conversation with its decoded images, checked (roles, the last turn, placeholders against images)."""
    try:
        request = Request(messages, images or None)
        if image_placeholders:
            request.messages()
        else:
            request.turns()
        return request
    except ValueError as err:
        raise APIError(400, str(err), "messages", "invalid_request") from err


def text_request(prompt: str) -> Request:
    try:
        return Request(prompt, plain=True)
    except ValueError as err:
        raise APIError(400, str(err), "prompt", "invalid_request") from err


def shown(text: str, limit: int = 200) -> str:
    """A client's text quoted in a message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class ImageReader:
    """An image_url's encoded bytes (data URLs, and paths under `root` when the operator allows it), its size from
    its header, and its decoding."""

    def __init__(self, max_bytes: int, root: str | None):
        self.max_bytes = max_bytes
        self.root = None if root is None else Path(root).resolve()

    def encoded(self, url: str) -> bytes:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64") or not payload:
                raise APIError(400, "an image data URL must be data:image/<type>;base64,<data>", "messages",
                               "invalid_image_url")
            if len(payload) * 3 // 4 > self.max_bytes:
                raise APIError(413, f"an image is larger than the server's limit of {self.max_bytes} bytes "
                                    f"(--max-image-mb)", "messages", "image_too_large")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise APIError(400, f"an image data URL is not valid base64 ({err})", "messages",
                               "invalid_image_url") from err
        if url.startswith(("http://", "https://")):
            raise APIError(400, "this server never fetches URLs: send the image as a data URL "
                                "(data:image/png;base64,...)", "messages", "remote_image_refused")
        return self._local_file(url)

    def _local_file(self, url: str) -> bytes:
        if self.root is None:
            raise APIError(400, "local image paths are refused (the operator can allow a folder with "
                                "--allow-local-images DIR): send the image as a data URL", "messages",
                           "local_image_refused")
        name = url.removeprefix("file://")
        if not name or len(name) > MAX_PATH_CHARS or "\x00" in name or not is_encodable(name):
            raise APIError(400, f"image path {shown(url)} is not a usable path: at most {MAX_PATH_CHARS} characters "
                                f"of valid text without NUL bytes", "messages", "invalid_image_url")
        try:
            path = Path(name)
            resolved = (path if path.is_absolute() else self.root / path).resolve()
            if not resolved.is_relative_to(self.root):
                raise APIError(400, f"image path {shown(url)} is outside the allowed folder", "messages",
                               "local_image_refused")
            if not resolved.is_file():
                raise APIError(400, f"image path {shown(url)} is not a file under the allowed folder", "messages",
                               "image_not_found")
            if resolved.stat().st_size > self.max_bytes:
                raise APIError(413, f"image {shown(url)} is larger than the server's limit of {self.max_bytes} bytes "
                                    f"(--max-image-mb)", "messages", "image_too_large")
            return resolved.read_bytes()
        except OSError as err:  # a name too long for the file system, a folder it may not read, ...
            raise APIError(400, f"image path {shown(url)} cannot be read ({err.strerror or type(err).__name__})",
                           "messages", "image_not_found") from err

    @staticmethod
    def size(data: bytes) -> tuple[int, int]:
        """(width, height) from the image's header, without decoding its pixels."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except Image.DecompressionBombError as err:
            raise APIError(413, f"an image is too large to decode ({err})", "messages", "image_too_large") from err
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise APIError(400, f"cannot read the {len(data)} bytes given as an image: not a readable image file",
                           "messages", "invalid_image") from err

    @staticmethod
    def decode(data: bytes):
        try:
            return load_image(data)
        except ImageTooLargeError as err:
            raise APIError(413, str(err), "messages", "image_too_large") from err
        except ValueError as err:
            raise APIError(400, str(err), "messages", "invalid_image") from err
