"""Multi-turn chat: earlier questions, images and answers stay in the context. LLaDA-V renders the conversation
anew every turn; the text-only LLaDA models continue the previous turn's ids, as their official chat.py does."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

from llada_v.tokenizer import IMAGE_PLACEHOLDER, chat_ids, place_images

from .config import GenerationConfig
from .generation.prompt import NO_VISION, ImageLike, PreparedRequest, Request
from .generation.results import GenerationResult, PromptTooLongError


class Conversation:
    """conv = pipe.chat(); conv.send("What is in the image?", image="cat.png"); conv.send("And its colour?")

    Each turn's images go where its text has `<image>`, or before its text when it has none. `pipeline` is the
    Pipeline that made it (Pipeline.chat), which it only calls: this module does not import it, so the pipeline can.

    When the family's rules say so (the text-only LLaDA models, FamilyRules.chat_continues_ids), a turn's prompt is
    official chat.py's: the previous turns' prompt and answer ids without <|endoftext|>, then the new question's
    chat-template ids without their leading BOS; `messages` then only records the turns (answers as text).
    """

    def __init__(self, pipeline, config: GenerationConfig | None = None, system: str | None = None):
        self.pipeline = pipeline
        self.config = config or GenerationConfig()
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.images: list[ImageLike] = []
        self.turn_ids: list[list[int]] = []  # chat_continues_ids: each turn's question and answer ids, no BOS

    def drop_oldest_turn(self) -> None:
        """Forget the oldest question, its images and its answer (the system turn stays)."""
        first = next((i for i, m in enumerate(self.messages) if m["role"] == "user"), None)
        if first is None:
            raise ValueError("the conversation has no turn to drop")
        images = self.messages[first]["content"].count(IMAGE_PLACEHOLDER)
        self.messages = self.messages[:first] + self.messages[first + 2:]  # the question and its answer
        self.images = self.images[images:]
        self.turn_ids = self.turn_ids[1:]

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def send(self, text: str, image: ImageLike | Sequence[ImageLike] | None = None) -> GenerationResult:
        """Ask the next question; the answer becomes part of the conversation."""
        request, commit = self._next_turn(text, image)
        with self._too_long_hint():
            result = self.pipeline.generate(request, config=self.config)
        commit(result)
        return result

    def stream(self, text: str, image: ImageLike | Sequence[ImageLike] | None = None):
        """Like send, streaming the partial answer (a Pipeline Stream); the turn joins the conversation once the
        stream ends."""
        request, commit = self._next_turn(text, image)
        with self._too_long_hint():
            return self.pipeline.stream(request, config=self.config, on_done=commit)

    @contextmanager
    def _too_long_hint(self):
        try:
            yield
        except PromptTooLongError as err:
            raise PromptTooLongError(f"{err}. The conversation holds {self.turns} earlier turn(s): drop the oldest "
                                     f"with drop_oldest_turn() (`/drop` in the chat CLI) or start over with reset() "
                                     f"(`/reset`)") from err

    def _next_turn(self, text: str, image) -> tuple[Request | PreparedRequest, Callable[[GenerationResult], None]]:
        """The turn's request, and what adds the turn and its answer to the conversation."""
        new_images = Request(text, image).images
        if self.pipeline.rules.chat_continues_ids:
            if new_images:
                raise ValueError(NO_VISION)
            return self._continued_ids(text)
        text, = place_images([text], len(new_images), "this turn")
        request = Request([*self.messages, {"role": "user", "content": text}], [*self.images, *new_images])

        def commit(result: GenerationResult) -> None:
            self.messages = [*request.prompt, {"role": "assistant", "content": result.text}]
            self.images = list(request.images)

        return request, commit

    def _continued_ids(self, text: str) -> tuple[PreparedRequest, Callable[[GenerationResult], None]]:
        """The start, the previous turns' ids, then the question's chat-template ids without their BOS (official
        chat.py). The start is BOS, or with a system turn BOS and the system turn as the template renders it."""
        tokenizer, eos = self.pipeline.tokenizer, self.pipeline.special.eos
        question = [{"role": "user", "content": text}]
        ids = chat_ids(tokenizer, question)
        start = chat_ids(tokenizer, [*self.messages[:1], *question])[:1 - len(ids)] if self.system else ids[:1]
        previous = [t for turn in self.turn_ids for t in turn]

        def commit(result: GenerationResult) -> None:
            self.messages = [*self.messages, *question, {"role": "assistant", "content": result.text}]
            # chat.py's "remove the <EOS>": the answer's padding goes, its <|eot_id|> stays
            self.turn_ids.append([t for t in ids[1:] + result.token_ids if t != eos])

        return PreparedRequest(start + previous + ids[1:], ()), commit
