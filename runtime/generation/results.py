"""What a generation gives back: the answer and what it cost, the same for a library call and a server request."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class PromptTooLongError(ValueError):
    """The prompt and the answer do not fit in the model's or the engines' sequence length."""


@dataclass
class GenerationStats:
    """What a generation cost. A library call's results share their batch's figures; a server request's are its own
    row's (batch_size 1, its own denoiser calls, and the time since it started). Readable as stats["nfe"] too.

    nfe: denoiser calls, = full_forwards + cached_forwards; steps: denoising steps; seconds; tokens_per_second: answer
    tokens / seconds; batch_size; prompt_lengths: each row's prompt positions (image embeddings included);
    stage_seconds: preprocess, vision, projector, full_forward, cached_forward, remasking and other (the rest);
    engine_seconds: vision + projector + full and cached forwards; queue_seconds: the wait before a server request
    started; finish_reason: "stop" (the model ended the answer: FamilyRules.final_answer) or "length" (cut at the
    answer's length).
    """

    nfe: int
    full_forwards: int
    cached_forwards: int
    steps: int
    seconds: float
    tokens_per_second: float
    batch_size: int
    prompt_lengths: list[int]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    engine_seconds: float = 0.0
    queue_seconds: float = 0.0
    finish_reason: str = "stop"

    def __getitem__(self, name: str):
        return getattr(self, name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """text: the answer; token_ids: its ids (LLaDA-V: up to, not including, <|eot_id|>; LLaDA: every position);
    stats: what it cost."""

    text: str
    token_ids: list[int]
    stats: GenerationStats | None = None
