"""An OpenAI-compatible HTTP server over the Scheduler (FastAPI; uvicorn runs it, or Ray Serve replicas).

    python -m runtime serve --engines engines            # then POST /v1/chat/completions, or open http://127.0.0.1:8000/

POST /v1/chat/completions takes OpenAI's chat format (text and `image_url` data-URL parts, `max_tokens`,
`temperature`, `seed`, `stream`) and POST /v1/completions a plain prompt, both with the diffusion settings as extra
body fields; GET /v1/models, GET /health (503 until the engines are loaded), GET /metrics (Prometheus) and GET /
(the playground). Errors are OpenAI's error JSON. The server never fetches a URL; local image paths only under
--allow-local-images DIR. Every request is held to the limits (limits.py) before the work they bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace

import anyio
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..config import GenerationConfig
from ..pipeline import Pipeline
from . import playground
from .auth import ApiKeyCheck
from .canvas import Canvas
from .errors import APIError, internal_error
from .limits import ConcurrencyLimit, PixelBudget
from .metrics import ServerMetrics
from .openai_inputs import ImageReader, chat_request, conversation, plain_prompt, text_request
from .responses import Completion, scheduler_refusal
from .scheduler import QueueFullError, Scheduler, SchedulerStoppedError
from .schemas import ChatCompletionRequest, CompletionRequest, CompletionSettings
from .settings import ServerSettings

log = logging.getLogger("runtime.serving.app")
REPLICA_ID = f"{socket.gethostname()}-{os.getpid()}"
PREPARE_THREADS = min(4, os.cpu_count() or 1)  # requests decoded and tokenized at once, off the engines' thread
DOCS_PATHS = ("/docs", "/docs/*", "/redoc", "/openapi.json")


def open_paths(settings: ServerSettings) -> tuple[str, ...]:
    """The paths that need no API key."""
    return ("/health", *(() if settings.protect_metrics else ("/metrics",)),
            *(playground.PATHS if settings.playground else ()), *(DOCS_PATHS if settings.docs else ()))


# ---- from the body to a GenerationConfig --------------------------------------------------------------------------

def generation_config(body: CompletionSettings, defaults: GenerationConfig) -> tuple[GenerationConfig, int]:
    """The request's GenerationConfig and max_tokens. gen_length is max_tokens rounded up to a whole number of
    blocks (block_length is cut to max_tokens when that is shorter and the request names no block length);
    steps, when not given, keep the defaults' tokens per step; the answer is cut at max_tokens."""
    if body.cfg_scale:
        raise APIError(400, "cfg_scale (classifier-free guidance) is not supported: the runtime decodes without "
                            "guidance, as the official generate.py does by default (cfg_scale 0)", "cfg_scale",
                       "unsupported")
    max_tokens = body.token_limit or defaults.gen_length
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
                "refresh": body.refresh or defaults.refresh,
                "refresh_interval": body.refresh_interval or defaults.refresh_interval,
                "drift_threshold": body.drift_threshold or defaults.drift_threshold,
                "threshold": defaults.threshold if body.threshold is None else body.threshold}
    try:
        return replace(defaults, **settings), max_tokens
    except ValueError as err:
        raise APIError(400, f"impossible generation settings: {err}", None, "invalid_settings") from err


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
            return await self._refuse(scope, send)
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
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        refusal = APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                                f"(--max-body-mb)", None, "body_too_large")
        await refusal.response()(scope, None, send)


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
        self.preparing: anyio.CapacityLimiter | None = None  # made in the app's event loop

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

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            raise APIError(503, "the engines are still loading" if self.failure is None else
                           f"the engines failed to load: {self.failure}", None, "not_ready", {"Retry-After": "5"})
        return self.scheduler

    def begin_stop(self, seconds: float) -> None:
        """Take no new requests; those running get `seconds` to finish, then fail (answered with an error)."""
        if self.scheduler is not None:
            self.scheduler.stop(seconds, wait=False)

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
    limits, budget = settings.limits, PixelBudget(settings.limits.max_megapixels_in_flight)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.preparing = anyio.CapacityLimiter(PREPARE_THREADS)
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

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="LLaDA-V", lifespan=lifespan, **docs)
    app.state.engine = engine
    # Added innermost first: a request meets the replica header, the limit on requests in progress, the Host check,
    # CORS, the key, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 2**20))
    if settings.api_keys:
        app.add_middleware(ApiKeyCheck, keys=settings.api_keys, open_paths=open_paths(settings))
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    if settings.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(ConcurrencyLimit, limit=limits.max_concurrent_requests)
    app.add_middleware(ReplicaHeader)
    if settings.playground:
        playground.add_playground(app)

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
        request_id = f"req-{uuid.uuid4().hex}"
        log.error("internal error in request %s (%s %s)", request_id, request.method, request.url.path,
                  exc_info=err)
        metrics.finished("failed")
        return internal_error(request_id).response()

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
        engine.ready()
        placeholders = engine.pipeline.rules.image_placeholders
        messages, urls = conversation(body, engine.pipeline.runner.config.has_vision, placeholders)
        limits.check_prompt(sum(len(m["content"]) for m in messages), len(urls))
        return await complete("chat", body, http, lambda decoded: chat_request(messages, decoded, placeholders),
                              urls)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = plain_prompt(body)
        limits.check_prompt(len(prompt), 0)
        return await complete("text", body, http, lambda decoded: text_request(prompt), [])

    async def complete(kind: str, body: CompletionSettings, http: HTTPRequest, make_request, urls: list[str]):
        """Admit one request (its limits, the queue's room, its images' pixels) before the work they bound, prepare
        it on a preparation thread, then answer from its events."""
        scheduler = engine.ready()
        if body.n != 1:
            raise APIError(400, "n must be 1: a request gives one answer (send several requests with other seeds)",
                           "n", "unsupported")
        if body.stream_canvas and not body.stream:
            raise APIError(400, "stream_canvas adds every step's canvas to a stream: use it with stream: true",
                           "stream_canvas", "unsupported")
        config, max_tokens = generation_config(body, settings.defaults)
        limits.check_generation(config)
        try:
            scheduler.check_room()
        except (QueueFullError, SchedulerStoppedError) as err:
            raise scheduler_refusal(err) from err
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        reservation = None

        def on_event(event):  # on the worker thread
            if event.kind in ("done", "error") and reservation is not None:
                reservation.release()
            loop.call_soon_threadsafe(events.put_nowait, event)

        def submit():  # on a preparation thread: read the images' sizes, take their pixels, decode, tokenize
            nonlocal reservation
            encoded = [images.encoded(url) for url in urls]
            reservation = budget.reserve(limits.image_pixels([images.size(data) for data in encoded]))
            try:
                request = make_request([images.decode(data) for data in encoded])
                return scheduler.submit(request, config, on_event, max_tokens, timeout=limits.request_timeout,
                                        canvas=body.stream_canvas)
            except (QueueFullError, SchedulerStoppedError) as err:
                reservation.release()
                raise scheduler_refusal(err) from err
            except BaseException:
                reservation.release()
                raise

        job = await anyio.to_thread.run_sync(submit, limiter=engine.preparing)
        tokenizer = engine.pipeline.tokenizer
        completion = Completion(kind, settings.name, job, events, tokenizer,
                                Canvas(tokenizer, engine.pipeline.special) if body.stream_canvas else None,
                                on_close=reservation.release)
        streaming = False
        try:
            first = await completion.next_event(http)  # "started" once it has a row, or "error"
            if first is None:  # the client went away
                return Response(status_code=499)
            if first.kind == "error":
                raise completion.error(first)
            if body.stream:
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                streaming = True
                return StreamingResponse(completion.chunks(first, include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            final = await completion.final_event(first, http)
            if final is None:
                return Response(status_code=499)
            if final.kind == "error":
                raise completion.error(final)
            return completion.response(final.result)
        finally:
            if not streaming:  # a stream closes itself when it ends
                completion.close()

    return app
