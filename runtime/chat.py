"""Multi-turn chat: earlier questions, images and answers stay in the context, as in LLaDA-V."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

from llada_v.tokenizer import IMAGE_PLACEHOLDER, place_images

from .config import GenerationConfig
from .generation.prompt import ImageLike, Request
from .generation.results import GenerationResult, PromptTooLongError


class Conversation:
    """conv = pipe.chat(); conv.send("What is in the image?", image="cat.png"); conv.send("And its colour?")

    Each turn's images go where its text has `<image>`, or before its text when it has none. `pipeline` is the
    Pipeline that made it (Pipeline.chat), which it only calls: this module does not import it, so the pipeline can.
    """

    def __init__(self, pipeline, config: GenerationConfig | None = None, system: str | None = None):
        self.pipeline = pipeline
        self.config = config or GenerationConfig()
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.images: list[ImageLike] = []

    def drop_oldest_turn(self) -> None:
        """Forget the oldest question, its images and its answer (the system turn stays)."""
        first = next((i for i, m in enumerate(self.messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError("the conversation has no turn to drop")
        images = self.messages[first]["content"].count(IMAGE_PLACEHOLDER)
        self.messages = self.messages[:first] + self.messages[first + 2:]  # the question and its answer
        self.images = self.images[images:]

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def send(self, text: str, image: ImageLike | Sequence[ImageLike] | None = None) -> GenerationResult:
        """Ask the next question; the answer becomes part of the conversation."""
        request = self._next_request(text, image)
        with self._too_long_hint():
            result = self.pipeline.generate(request, config=self.config)
        self._commit(request, result)
        return result

    def stream(self, text: str, image: ImageLike | Sequence[ImageLike] | None = None):
        """Like send, streaming the partial answer (a Pipeline Stream); the turn joins the conversation once the
        stream ends."""
        request = self._next_request(text, image)
        with self._too_long_hint():
            return self.pipeline.stream(request, config=self.config,
                                        on_done=lambda result: self._commit(request, result))

    @contextmanager
    def _too_long_hint(self):
        try:
            yield
        except PromptTooLongError as err:
            raise PromptTooLongError(f"{err}. The conversation holds {self.turns} earlier turn(s): drop the oldest "
                                     f"with drop_oldest_turn() (`/drop` in the chat CLI) or start over with reset() "
                                     f"(`/reset`)") from err

    def _next_request(self, text: str, image) -> Request:
        new_images = Request(text, image).images
        text, = place_images([text], len(new_images), "this turn")
        messages = [*self.messages, {"role": "user", "content": text}]
        return Request(messages, [*self.images, *new_images])

    def _commit(self, request: Request, result: GenerationResult) -> None:
        self.messages = [*request.prompt, {"role": "assistant", "content": result.text}]
        self.images = list(request.images)
