"""The OpenAI request bodies the server takes: chat completions and (text) completions, with the diffusion
settings as extra fields (the `openai` client's extra_body).

Known fields are type-checked strictly at every depth (a string is not a number or a boolean); fields OpenAI
defines that do not apply to a diffusion model (top_p, presence_penalty, stop, user, ...) are accepted and
ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import CACHE_MODES, REFRESH_POLICIES, REMASKING


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(Strict):
    url: str
    detail: str | None = None


class ContentPart(Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionSettings(Strict):
    """What both endpoints share: OpenAI's sampling fields and the diffusion settings."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    block_length: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    cache: Literal[CACHE_MODES] | None = None  # type: ignore[valid-type]
    refresh: Literal[REFRESH_POLICIES] | None = None  # type: ignore[valid-type]
    refresh_interval: int | None = Field(None, ge=1)
    drift_threshold: float | None = Field(None, gt=0, allow_inf_nan=False)
    threshold: float | None = Field(None, gt=0, le=1)
    remasking: Literal[REMASKING] | None = None  # type: ignore[valid-type]
    # LLaDA's classifier-free guidance: refused unless 0 (docs/fidelity.md, "LLaDA decoding").
    cfg_scale: float | None = None
    # With stream: every step's whole answer canvas under the chunks' `llada` key (the playground draws it).
    stream_canvas: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(CompletionSettings):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens or self.max_completion_tokens


class CompletionRequest(CompletionSettings):
    """POST /v1/completions: a plain prompt (one text, or a list of one), no chat template."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
