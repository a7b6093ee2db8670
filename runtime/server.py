"""An OpenAI-compatible HTTP server over the Scheduler (FastAPI; uvicorn runs it, or Ray Serve replicas).

    python -m runtime serve --engines engines            # then POST /v1/chat/completions

POST /v1/chat/completions takes OpenAI's chat format (text and `image_url` data-URL parts, `max_tokens`,
`temperature`, `seed`, `stream`) and the diffusion settings as extra body fields; GET /v1/models,
GET /health (503 until the engines are loaded) and GET /metrics (Prometheus). Errors are OpenAI's error
JSON. The server never fetches a URL; local image paths only under --allow-local-images DIR.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llada_v.image_processing import ImageTooLargeError, load_image
from llada_v.tokenizer import with_image_placeholders

from .config import CACHE_MODES, REMASKING, GenerationConfig
from .metrics import ServerMetrics
from .pipeline import BACKENDS, Pipeline, PromptTooLongError
from .prompt import Request
from .scheduler import Event, QueueFullError, Scheduler, SchedulerStoppedError

log = logging.getLogger("runtime.server")
REPLICA_ID = f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServerSettings:
    """What `python -m runtime serve` is given. defaults: the settings of a request that names none
    (max_tokens -> gen_length); max_body_mb: a request body; max_image_mb: one image's encoded bytes."""

    engines: str
    backend: str = "onnxruntime"
    device: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    image_cache_mb: float = 256
    max_body_mb: float = 32
    max_image_mb: float = 16
    allow_local_images: str | None = None
    model_name: str | None = None
    defaults: GenerationConfig = field(default_factory=lambda: GenerationConfig(gen_length=64, block_length=32))
    load_in_background: bool = True  # False: the app's startup waits for the engines (Ray Serve replicas)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        for name, zero_ok in (("max_body_mb", False), ("max_image_mb", False), ("image_cache_mb", True)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf \
                    or (value == 0 and not zero_ok):
                raise ValueError(f"{name} must be a number of MB {'>= 0' if zero_ok else '> 0'}, got {value!r}")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise ValueError(f"--allow-local-images {self.allow_local_images}: not a folder")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.engines).resolve().name


# ---- the OpenAI request body ----------------------------------------------------------------------------

class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Known fields are type-checked strictly (a string is not a number); fields OpenAI defines that do not
    apply to a diffusion model (top_p, presence_penalty, user, ...) are accepted and ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # The diffusion settings (the `openai` client's extra_body).
    block_length: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    cache: Literal[CACHE_MODES] | None = None  # type: ignore[valid-type]
    refresh_interval: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, gt=0, le=1)
    remasking: Literal[REMASKING] | None = None  # type: ignore[valid-type]


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.counted = counted  # the scheduler has counted this request's outcome already

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error" if self.status == 500 else "service_unavailable"
        return {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(
            self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def job_error(err: BaseException) -> APIError:
    """The APIError for what a job reported (the scheduler has counted its outcome)."""
    if isinstance(err, ImageTooLargeError):
        error = APIError(413, str(err), "messages", "image_too_large")
    elif isinstance(err, PromptTooLongError):
        error = APIError(400, str(err), "messages", "context_length_exceeded")
    elif isinstance(err, ValueError):
        error = APIError(400, str(err), None, "invalid_request")
    elif isinstance(err, SchedulerStoppedError):
        error = APIError(503, str(err), None, "shutting_down", {"Retry-After": "5"})
    else:
        error = APIError(500, f"the engines failed on this request ({type(err).__name__}: {err})", None,
                         "engine_error")
    error.counted = True
    return error


# ---- from the body to a Request and a GenerationConfig ----------------------------------------------------

def generation_config(body: ChatCompletionRequest, defaults: GenerationConfig) -> tuple[GenerationConfig, int]:
    """The request's GenerationConfig and max_tokens. gen_length is max_tokens rounded up to a whole number of
    blocks (block_length is cut to max_tokens when that is shorter and the request names no block length);
    steps, when not given, keep the defaults' tokens per step; the answer is cut at max_tokens."""
    max_tokens = body.max_tokens or body.max_completion_tokens or defaults.gen_length
    block = body.block_length or min(defaults.block_length, max_tokens)
    blocks = -(-max_tokens // block)
    gen_length = blocks * block
    if body.steps is not None:
        steps = body.steps
    else:
        per_block = max(1, round(defaults.steps_per_block * block / defaults.block_length))
        steps = blocks * per_block
    settings = {"gen_length": gen_length, "block_length": block, "steps": steps,
                "temperature": defaults.temperature if body.temperature is None else body.temperature,
                "seed": defaults.seed if body.seed is None else body.seed,
                "cache": body.cache or defaults.cache, "remasking": body.remasking or defaults.remasking,
                "refresh_interval": body.refresh_interval or defaults.refresh_interval,
                "threshold": defaults.threshold if body.threshold is None else body.threshold}
    try:
        return replace(defaults, **settings), max_tokens
    except ValueError as err:
        raise APIError(400, f"impossible generation settings: {err}", None, "invalid_settings") from err


class ImageReader:
    """Turns an image_url into a decoded image: data URLs, and paths under `root` when the operator allows it."""

    def __init__(self, max_bytes: int, root: str | None):
        self.max_bytes = max_bytes
        self.root = None if root is None else Path(root).resolve()

    def read(self, url: str):
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64") or not payload:
                raise APIError(400, "an image data URL must be data:image/<type>;base64,<data>", "messages",
                               "invalid_image_url")
            if len(payload) * 3 // 4 > self.max_bytes:
                raise APIError(413, f"an image is larger than the server's limit of {self.max_bytes} bytes", "messages",
                               "image_too_large")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise APIError(400, f"an image data URL is not valid base64 ({err})", "messages", "invalid_image_url")
            return self._decode(data)
        if url.startswith(("http://", "https://")):
            raise APIError(400, "this server never fetches URLs: send the image as a data URL "
                                "(data:image/png;base64,...)", "messages", "remote_image_refused")
        return self._decode(self._local_file(url))

    def _local_file(self, url: str) -> bytes:
        if self.root is None:
            raise APIError(400, "local image paths are refused (the operator can allow a folder with "
                                "--allow-local-images DIR): send the image as a data URL", "messages",
                           "local_image_refused")
        path = Path(url.removeprefix("file://"))
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise APIError(400, f"image path {url} is outside the allowed folder", "messages", "local_image_refused")
        if not resolved.is_file():
            raise APIError(400, f"image path {url} is not a file under the allowed folder", "messages",
                           "image_not_found")
        if resolved.stat().st_size > self.max_bytes:
            raise APIError(413, f"image {url} is larger than the server's limit of {self.max_bytes} bytes", "messages",
                           "image_too_large")
        return resolved.read_bytes()

    @staticmethod
    def _decode(data: bytes):
        try:
            return load_image(data)
        except ImageTooLargeError as err:
            raise APIError(413, str(err), "messages", "image_too_large") from err
        except ValueError as err:
            raise APIError(400, str(err), "messages", "invalid_image") from err


def conversation(body: ChatCompletionRequest, images: ImageReader) -> Request:
    """The messages as a conversation with `<image>` placeholders, and the decoded images in order.

    A message's image parts go before its text, as LLaDA-V was trained ("<image>\\nquestion"), whatever
    their order among the parts, unless the text places them with `<image>` itself.
    """
    messages, decoded = [], []
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        texts, urls = [], []
        for j, part in enumerate(message.content):
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, "a text part needs its text", f"messages[{i}].content[{j}].text")
                texts.append(part.text)
            else:
                if part.image_url is None:
                    raise APIError(400, "an image_url part needs its image_url", f"messages[{i}].content[{j}]")
                urls.append(part.image_url.url)
        if urls and message.role != "user":
            raise APIError(400, "only user messages can hold images", f"messages[{i}].content")
        text = "\n".join(texts)
        if urls and "<image>" not in text:
            text = with_image_placeholders(text, len(urls))
        messages.append({"role": message.role, "content": text})
        decoded += [images.read(url) for url in urls]
    try:
        request = Request(messages, decoded or None)
        request.messages()  # placeholders against images, roles, the last turn: checked before queueing
        return request
    except ValueError as err:
        raise APIError(400, str(err), "messages", "invalid_request") from err


# ---- the app ---------------------------------------------------------------------------------------------------

class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before it is parsed (Starlette has no body limit of its
    own, and uvicorn limits only headers), whether it declares its length or streams it (chunked): past the
    limit the app is told the client left, and whatever it answers is replaced by the 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen, too_large = 0, False

        async def limited_receive():
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not too_large:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"the request body is larger than the server's limit of "
                                                f"{self.max_bytes} bytes", "type": "request_too_large",
                                     "param": None, "code": "body_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ReplicaHeader:
    """Adds `x-llada-replica` (host and process) to every response. Plain ASGI: Starlette's @app.middleware
    ("http") would hide a client's disconnect from the endpoint, which must free the client's row."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = (b"x-llada-replica", REPLICA_ID.encode())

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class Engine:
    """The loaded Pipeline and its Scheduler, or why they are not (yet) there."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.pipeline: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.failure: str | None = None

    def load(self) -> None:
        s = self.settings
        try:
            self.pipeline = Pipeline.load(s.engines, s.backend, device=s.device, image_cache_mb=s.image_cache_mb)
            self.scheduler = Scheduler(self.pipeline, s.max_batch, s.max_queue, self.metrics).start()
            log.info("engines loaded from %s (%s backend), serving as %r", s.engines, s.backend, s.name)
        except Exception as err:
            self.failure = f"{type(err).__name__}: {err}"
            log.error("cannot load the engines: %s", self.failure)
            raise

    def close(self, timeout: float | None) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(timeout)
        if self.pipeline is not None:
            self.pipeline.close()


def create_app(settings: ServerSettings, *, on_load_failure=None, shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app. on_load_failure(): called when loading in the background fails (the CLI exits)."""
    metrics = ServerMetrics()
    engine = Engine(settings, metrics)
    images = ImageReader(int(settings.max_image_mb * 2**20), settings.allow_local_images)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.load_in_background:
            def load():
                try:
                    engine.load()
                except Exception:
                    if on_load_failure is not None:
                        on_load_failure()
            threading.Thread(target=load, name="llada-v-load", daemon=True).start()
        else:
            await run_in_threadpool(engine.load)
        yield
        await run_in_threadpool(engine.close, shutdown_timeout)

    app = FastAPI(title="LLaDA-V", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 2**20))
    app.add_middleware(ReplicaHeader)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        if not err.counted:
            metrics.finished("rejected" if err.status == 503 else "invalid" if err.status < 500 else "failed")
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            where, message = None, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})"
        else:
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
            message = f"{where or 'body'}: {first.get('msg')}"
        metrics.finished("invalid")
        return APIError(400, message, where, first.get("type")).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return APIError(err.status_code, str(err.detail), None, None).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request, err: Exception):
        log.exception("unexpected error")
        metrics.finished("failed")
        return APIError(500, f"the server failed on this request ({type(err).__name__}: {err})", None,
                        "server_error").response()

    @app.get("/health")
    async def health():
        if engine.scheduler is not None:
            return {"status": "ok", "model": settings.name}
        status = "failed" if engine.failure else "loading"
        return JSONResponse({"status": status, "error": engine.failure}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.name, "object": "model", "created": 0,
                                            "owned_by": "llada-v-engines"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        scheduler = engine.scheduler
        if scheduler is None:
            raise APIError(503, "the engines are still loading" if engine.failure is None else
                           f"the engines failed to load: {engine.failure}", None, "not_ready", {"Retry-After": "5"})
        if body.n != 1:
            raise APIError(400, "n must be 1: a request gives one answer (send several requests with other seeds)",
                           "n", "unsupported")
        config, max_tokens = generation_config(body, settings.defaults)
        request = await run_in_threadpool(conversation, body, images)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            job = scheduler.submit(request, config, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                   max_tokens)
        except QueueFullError as err:
            raise APIError(503, str(err), None, "queue_full", {"Retry-After": "1"}) from err
        except SchedulerStoppedError as err:
            raise APIError(503, str(err), None, "shutting_down", {"Retry-After": "5"}) from err
        completion = Completion(settings.name, job, events, engine.pipeline.tokenizer)
        try:
            first = await completion.next_event(http)  # "started" once it has a row, or "error"
        except BaseException:
            job.cancel()
            raise
        if first is None:  # the client went away
            job.cancel()
            return Response(status_code=499)
        if first.kind == "error":
            raise job_error(first.error)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(completion.chunks(first, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        event = first
        while event.kind != "done":
            event = await completion.next_event(http)
            if event is None:
                job.cancel()
                return Response(status_code=499)
            if event.kind == "error":
                raise job_error(event.error)
        return completion.response(event.result)

    return app


class Completion:
    """One request's events turned into a chat.completion, or chat.completion.chunk server-sent events."""

    def __init__(self, model: str, job, events: asyncio.Queue, tokenizer):
        self.model, self.job, self.events, self.tokenizer = model, job, events, tokenizer
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    async def next_event(self, http: HTTPRequest | None) -> Event | None:
        """The next event; None when the client disconnected first (checked every 0.25 s)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), 0.25)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    return None

    def response(self, result) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.stats["finish_reason"], "logprobs": None}],
                "usage": usage(result), "llada": result.stats}

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    async def chunks(self, event: Event, include_usage: bool):
        """The answer's final prefix as it grows: each chunk adds text, none takes any back. A tokens event
        is shown up to its last whole character (a token can end inside a UTF-8 sequence)."""
        shown = ""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                if event.kind == "tokens":
                    text = self.tokenizer.decode(event.token_ids, skip_special_tokens=True).rstrip("\ufffd")
                    if text.startswith(shown) and len(text) > len(shown):
                        yield self._chunk({"content": text[len(shown):]})
                        shown = text
                elif event.kind == "done":
                    result = event.result
                    rest = result.text[len(shown):] if result.text.startswith(shown) else ""
                    if rest:
                        yield self._chunk({"content": rest})
                    yield self._chunk({}, result.stats["finish_reason"], llada=result.stats)
                    if include_usage:
                        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                 "model": self.model, "choices": [], "usage": usage(result)}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    break
                elif event.kind == "error":  # the engines failed after the response started: the last event
                    yield f"data: {json.dumps(job_error(event.error).body())}\n\n"
                    break
                event = await self.next_event(None)
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # a no-op once it finished; frees the row of a client that went away


def usage(result) -> dict:
    prompt, completion = result.stats["prompt_length"], len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
