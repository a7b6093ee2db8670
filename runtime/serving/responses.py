"""One request's events turned into OpenAI's answer: a chat.completion or text_completion object, or the stream
of their chunks as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request as HTTPRequest

from llada_v.image_processing import ImageTooLargeError

from ..generation.results import PromptTooLongError
from .canvas import Canvas
from .errors import APIError, internal_error
from .scheduler import Event, QueueFullError, RequestTimeoutError, SchedulerStoppedError

log = logging.getLogger("runtime.serving.app")

KINDS = {"chat": ("chatcmpl", "chat.completion", "chat.completion.chunk"),
         "text": ("cmpl", "text_completion", "text_completion")}


class Completion:
    """kind "chat" (POST /v1/chat/completions) or "text" (POST /v1/completions). canvas: the stream also carries
    every step's answer canvas (Canvas) under the chunks' `llada` key. on_close: called once the request is over
    (its answer sent, failed, or its client gone)."""

    def __init__(self, kind: str, model: str, job, events: asyncio.Queue, tokenizer, canvas: Canvas | None = None,
                 on_close=lambda: None):
        self.kind, self.model, self.job, self.events, self.tokenizer = kind, model, job, events, tokenizer
        self.canvas, self.on_close = canvas, on_close
        prefix, self.object, self.chunk_object = KINDS[kind]
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def close(self) -> None:
        self.job.cancel()  # a no-op once it finished; frees the row of a client that went away
        self.on_close()

    async def next_event(self, http: HTTPRequest | None) -> Event | None:
        """The next event; None when the client disconnected first (checked every 0.25 s)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), 0.25)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    return None

    async def final_event(self, first: Event, http: HTTPRequest) -> Event | None:
        """The "done" or "error" event after `first`, skipping progress; None when the client left first."""
        event = first
        while event.kind not in ("done", "error"):
            event = await self.next_event(http)
            if event is None:
                return None
        return event

    def error(self, event: Event):
        return job_error(event.error, self.id, "messages" if self.kind == "chat" else "prompt")

    def _choice(self, text: str, finish_reason: str | None, chunk: bool) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if chunk:
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason,
                    "logprobs": None}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                "logprobs": None}

    def response(self, result) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self._choice(result.text, result.stats.finish_reason, chunk=False)],
                "usage": usage(result), "llada": result.stats.to_dict()}

    def _chunk(self, choices: list[dict], **extra) -> str:
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def _text_chunk(self, text: str, finish_reason: str | None = None, **extra) -> str:
        return self._chunk([self._choice(text, finish_reason, chunk=True)], **extra)

    async def chunks(self, event: Event, include_usage: bool):
        """The answer's final prefix as it grows: each chunk adds text, none takes any back. A tokens event
        is shown up to its last whole character (a token can end inside a UTF-8 sequence). Whatever ends the
        request, the stream ends with `data: [DONE]`, after an error event when it failed."""
        shown = ""
        try:
            if self.kind == "chat":
                yield self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                    "logprobs": None}])
            while True:
                if event.kind == "tokens":
                    text = self.tokenizer.decode(event.token_ids, skip_special_tokens=True).rstrip("\ufffd")
                    if text.startswith(shown) and len(text) > len(shown):
                        yield self._text_chunk(text[len(shown):])
                        shown = text
                elif event.kind == "canvas" and self.canvas is not None:
                    yield self._text_chunk("", llada={"canvas": self.canvas.update(event.token_ids, event.step)})
                elif event.kind == "done":
                    result = event.result
                    rest = result.text[len(shown):] if result.text.startswith(shown) else ""
                    if rest:
                        yield self._text_chunk(rest)
                    yield self._text_chunk("", result.stats.finish_reason, llada=result.stats.to_dict())
                    if include_usage:
                        yield self._chunk([], usage=usage(result))
                    break
                elif event.kind == "error":  # the request failed after the response started: the last event
                    yield f"data: {json.dumps(self.error(event).body())}\n\n"
                    break
                event = await self.next_event(None)
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def job_error(err: BaseException, request_id: str, prompt_param: str = "messages") -> APIError:
    """The APIError for what a job reported (the scheduler has counted its outcome); prompt_param: the body field
    that holds the prompt."""
    if isinstance(err, ImageTooLargeError):
        error = APIError(413, str(err), "messages", "image_too_large")
    elif isinstance(err, PromptTooLongError):
        error = APIError(400, str(err), prompt_param, "context_length_exceeded")
    elif isinstance(err, ValueError):
        error = APIError(400, str(err), None, "invalid_request")
    elif isinstance(err, SchedulerStoppedError):
        error = scheduler_refusal(err)
    elif isinstance(err, RequestTimeoutError):
        error = APIError(504, f"{err} (the server's --request-timeout)", None, "request_timeout")
    else:
        log.error("request %s failed in the engines: %s: %s", request_id, type(err).__name__, err)
        error = internal_error(request_id)
    error.counted = True
    return error


def scheduler_refusal(err: QueueFullError | SchedulerStoppedError) -> APIError:
    """503 with Retry-After: the queue is full, or the server is shutting down."""
    if isinstance(err, QueueFullError):
        return APIError(503, str(err), None, "queue_full", {"Retry-After": "1"})
    return APIError(503, str(err), None, "shutting_down", {"Retry-After": "5"})


def usage(result) -> dict:
    prompt, completion = result.stats.prompt_lengths[0], len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
