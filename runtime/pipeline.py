"""Pipeline: the library's front door. Loads a backend's runner, turns requests into prompt embeddings and runs
the diffusion loop (generation/decoder.py) over them; backend-agnostic, on torch tensors on the runner's device.
The serving room and the chat use the same public steps: prepare, embed_prompts, start (or decoder), results.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from llada_v import SpecialTokens, load_tokenizer

from .backends import load_runner
from .backends.runner import Runner
from .chat import Conversation
from .config import GenerationConfig
from .generation.batch import Batch
from .generation.decoder import Decoder
from .generation.family import FamilyRules
from .generation.prompt import (ImageLike, PreparedRequest, Request, as_request, image_embeddings, is_conversation,
                                prepare, prompt_embeddings, request_ids)
from .generation.results import GenerationResult, GenerationStats, PromptTooLongError
from .generation.timing import StageTimer

if TYPE_CHECKING:
    from .generation.image_cache import ImageEmbeddingCache


class Pipeline:
    """image_cache: an ImageEmbeddingCache shared by every call (None: each image is encoded anew)."""

    def __init__(self, runner: Runner, image_cache: ImageEmbeddingCache | None = None):
        self.image_cache = image_cache
        self.runner = runner.activate()
        self.tokenizer = load_tokenizer(runner.folder)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        # The model family's prompt format, banned ids, stop rule and answer (generation/family.py).
        self.rules = FamilyRules.of(runner.config.family, self.special)
        try:
            request_ids(Request("?"), self.tokenizer, self.rules)
        except Exception as err:  # jinja2's TemplateError family, or a template that renders no text
            raise ValueError(f"the chat template in {runner.folder / 'tokenizer_config.json'} cannot be rendered "
                             f"({type(err).__name__}: {err}): copy the checkpoint's tokenizer_config.json "
                             f"again") from err

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", *, device: str | None = None,
             image_cache_mb: float = 0, **options) -> "Pipeline":
        """An engines folder with backend "onnxruntime" or "tensorrt", or a checkpoint folder with "torch".

        device: "cpu" or "cuda" (default: "cuda" for tensorrt, else "cpu"); image_cache_mb: keep up to this many MB
        of image embeddings for images seen again (0 = none); options: the backend's own, torch: dtype (default:
        float32 on a CPU, bfloat16 on CUDA) and fused_cache (see TorchRunner); onnxruntime: providers.
        """
        if not isinstance(path, (str, Path)):
            raise ValueError(f"path must be an engines folder (or a checkpoint folder for backend 'torch') as a str "
                             f"or Path, got {path!r}")
        if not isinstance(image_cache_mb, (int, float)) or isinstance(image_cache_mb, bool) \
                or not 0 <= image_cache_mb < float("inf"):
            raise ValueError(f"image_cache_mb must be a number of MB >= 0, got {image_cache_mb!r}")
        runner = load_runner(path, backend, device, **options)
        if image_cache_mb == 0:
            return cls(runner)
        from .generation.image_cache import ImageEmbeddingCache

        return cls(runner, ImageEmbeddingCache(int(image_cache_mb * 2**20)))

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- public API ---------------------------------------------------------------------------------

    def generate(self, prompt, image: ImageLike | Sequence[ImageLike] | None = None,
                 config: GenerationConfig | None = None, *, on_step: Callable[[str], None] | None = None):
        """Generate an answer to `prompt` (a string, a conversation or a Request) about `image`(s).

        A conversation is a list of message dicts ({"role", "content"}). Any other list is a batch of
        requests (strings, (prompt, image) tuples or Requests, whose prompts may be conversations): it runs
        as one batch and returns a list of results, each equal to its request run alone. on_step(text)
        receives the partially decoded answer after every step (single requests only).

        Each result's stats (GenerationStats) are its batch's figures: denoiser calls, steps, seconds, per stage.
        """
        batched = isinstance(prompt, list) and not is_conversation(prompt)
        if batched:
            if image is not None:
                raise ValueError("with a list of requests, give each request its image: [(prompt, image), ...]")
            if on_step is not None:
                raise ValueError("on_step streams a single request, not a batch")
            requests = [as_request(p) for p in prompt]
            if not requests:
                raise ValueError("the list of requests is empty")
        else:
            requests = [self._request(prompt, image)]
        decoder = self.start(requests, config)
        for answers in decoder:
            if on_step is not None:
                on_step(self.partial_text(answers[0]))
        results = self.results(decoder)
        return results if batched else results[0]

    def stream(self, prompt, image: ImageLike | Sequence[ImageLike] | None = None,
               config: GenerationConfig | None = None, *,
               on_done: Callable[[GenerationResult], None] | None = None) -> "Stream":
        """Iterate over the partially decoded answer after each step; `.result` holds the result at the end, which
        is also handed to on_done(result)."""
        return Stream(self, self.start([self._request(prompt, image)], config), on_done)

    def chat(self, config: GenerationConfig | None = None, system: str | None = None) -> Conversation:
        return Conversation(self, config, system)

    # ---- the steps the public calls are made of (the serving room runs them itself) -------------------

    @staticmethod
    def _request(prompt, image) -> Request | PreparedRequest:
        if isinstance(prompt, (Request, PreparedRequest)):
            if image is not None:
                raise ValueError("a Request carries its own image: do not pass image= as well")
            return prompt
        return Request(prompt, image)

    def start(self, requests: list[Request | PreparedRequest], config: GenerationConfig | None) -> Decoder:
        """The loop over `requests` (not run yet): their prompt embeddings, left-padded into one batch."""
        cfg = GenerationConfig() if config is None else config
        if not isinstance(cfg, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
        timer = StageTimer(self.runner.device)
        with timer("preprocess"):
            prepared = [self._prepared(request) for request in requests]
        prompts = self.embed_prompts(prepared, timer)
        self.check_fits([len(prompt) for prompt in prompts], cfg)
        return self.decoder(prompts, cfg, timer)

    def decoder(self, prompts: list[torch.Tensor], cfg: GenerationConfig, timer: StageTimer,
                seeds: list[int] | None = None, tags: list | None = None) -> Decoder:
        """The loop over prompt embeddings [Lp, C] (checked with check_fits), one row each; seeds and tags per row
        (see Decoder)."""
        batch = Batch.left_padded(prompts, cfg.gen_length, self.special.mask, self.runner)
        return Decoder(self.runner, batch, cfg, self.rules, timer, seeds, tags)

    def prepare(self, request: Request) -> PreparedRequest:
        """The request's prompt ids and decoded images: the CPU work before the engines, safe on any thread."""
        return prepare(request, self.tokenizer, self.rules, self.runner.config.has_vision)

    def _prepared(self, request: Request | PreparedRequest) -> PreparedRequest:
        return request if isinstance(request, PreparedRequest) else self.prepare(request)

    def embed_prompts(self, requests: list[Request | PreparedRequest], timer: StageTimer) -> list[torch.Tensor]:
        """Each request's prompt [Lp, C], its images spliced in (all images through one vision call)."""
        prepared = [self._prepared(r) for r in requests]
        images = image_embeddings(prepared, self.runner, timer, self.image_cache)
        return [prompt_embeddings(p.ids, im, self.runner) for p, im in zip(prepared, images)]

    def results(self, decoder: Decoder) -> list[GenerationResult]:
        """Every row's result once the loop is done; they share the batch's figures (GenerationStats)."""
        seconds = decoder.timer.elapsed()
        answers = [self.rules.final_answer(ids) for ids in decoder.answers]
        counts, timing = decoder.counts, decoder.timer.stats(seconds)
        tokens = sum(len(ids) for ids, _ in answers)
        return [GenerationResult(self.text(ids), ids, GenerationStats(
            nfe=counts["full_forwards"] + counts["cached_forwards"], **counts, seconds=seconds,
            tokens_per_second=tokens / seconds, batch_size=len(answers),
            prompt_lengths=list(decoder.batch.prompt_lengths), **copy.deepcopy(timing), finish_reason=reason))
            for ids, reason in answers]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def partial_text(self, answer: list[int]) -> str:
        """The answer decoded up to its first still-masked position (or LLaDA-V's <|eot_id|>)."""
        return self.text(self.rules.final_prefix(answer))

    def check_fits(self, prompt_lengths: list[int], cfg: GenerationConfig) -> None:
        """PromptTooLongError when a prompt of these many positions and the answer do not fit the model or the
        engines (a server checks a prompt's text ids this way before queueing it: its images only add positions);
        ValueError when the engines cannot decode blocks this long (or, with the prefix cache, answers this long)
        in one call."""
        limits = self.runner.limits
        if limits is not None and cfg.block_length > limits.max_block:
            raise ValueError(f"block_length {cfg.block_length} is more than these engines decode in one call "
                             f"({limits.max_block}): lower block_length, or rebuild the engines with "
                             f"`python -m exporter build --max-block {cfg.block_length}`")
        if limits is not None and cfg.cache == "prefix" and cfg.gen_length > limits.max_gen_length:
            raise ValueError(f"with cache='prefix' a cached pass runs the block and the answer after it, up to "
                             f"gen_length {cfg.gen_length} positions, more than these engines take in one call "
                             f"({limits.max_gen_length}): use cache='dual', lower gen_length, or rebuild the "
                             f"engines with `python -m exporter build --max-gen-length {cfg.gen_length}`")
        limit = self.runner.max_sequence_length
        prompt_limit = self.runner.config.tokenizer_model_max_length
        for length in prompt_lengths:
            if prompt_limit is not None and length > prompt_limit:
                # The official code would silently cut the prompt here, assistant header included.
                raise PromptTooLongError(f"the prompt takes {length} positions (image embeddings included), "
                                         f"more than the model's tokenizer_model_max_length {prompt_limit}: shorten "
                                         f"the prompt or use fewer or smaller images")
            if length + cfg.gen_length > limit:
                raise PromptTooLongError(f"the prompt takes {length} positions (image embeddings included) and "
                                         f"gen_length is {cfg.gen_length}: {length + cfg.gen_length} exceeds "
                                         f"the maximum sequence length {limit} of these engines/this model; shorten "
                                         f"the prompt, use fewer or smaller images, or lower gen_length")


class Stream:
    """Iterator over the partial answer text after each step of one request; `.result` once exhausted."""

    def __init__(self, pipeline: Pipeline, decoder: Decoder,
                 on_done: Callable[[GenerationResult], None] | None = None):
        self._pipeline, self._decoder, self._on_done = pipeline, decoder, on_done
        self._steps = iter(decoder)
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            answers = next(self._steps)
        except StopIteration:
            if self.result is None:
                self.result = self._pipeline.results(self._decoder)[0]
                if self._on_done is not None:
                    self._on_done(self.result)
            raise
        return self._pipeline.partial_text(answers[0])
