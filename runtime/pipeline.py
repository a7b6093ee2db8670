"""Pipeline: the public API. Loads a backend's runner, turns requests into prompt embeddings and runs
the diffusion loop (decoding.py) over them; backend-agnostic, on torch tensors on the runner's device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from llada_v import SpecialTokens, conversation_ids, load_tokenizer

from .config import BACKENDS, GenerationConfig
from .decoding import Batch, Decoder, StageTimer, final_prefix, stop_position
from .image_cache import ImageEmbeddingCache
from .prompt import (ImageLike, PreparedRequest, Request, as_request, image_embeddings, is_conversation, prepare,
                     prompt_embeddings)
from .runner import Runner

if TYPE_CHECKING:
    from .chat import Conversation


@dataclass
class GenerationResult:
    """text: the answer; token_ids: its ids, up to (not including) <|eot_id|>; stats: see Pipeline.generate."""

    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


class PromptTooLongError(ValueError):
    """The prompt and the answer do not fit in the model's or the engines' sequence length."""


class Pipeline:
    """image_cache: an ImageEmbeddingCache shared by every call (None: each image is encoded anew)."""

    def __init__(self, runner: Runner, image_cache: ImageEmbeddingCache | None = None):
        self.image_cache = image_cache
        self.runner = runner.activate()
        self.tokenizer = load_tokenizer(runner.folder)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        try:
            conversation_ids(self.tokenizer, [{"role": "user", "content": "?"}])
        except Exception as err:  # jinja2's TemplateError family, or a template that renders no text
            raise ValueError(f"the chat template in {runner.folder / 'tokenizer_config.json'} cannot be rendered "
                             f"({type(err).__name__}: {err}): copy the checkpoint's tokenizer_config.json "
                             f"again") from err
        # The mask token is banned too: committing it would leave the position masked.
        banned = (*self.special.banned_at_masked, self.special.mask)
        self.banned_ids = torch.tensor(banned, dtype=torch.int64, device=runner.device)

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", *, device: str | None = None,
             dtype: torch.dtype | None = None, providers: list[str] | None = None,
             fused_cache: bool = True, image_cache_mb: float = 0) -> "Pipeline":
        """An engines folder with backend "onnxruntime" or "tensorrt", or a checkpoint folder with "torch".

        device: "cpu" or "cuda" (default: "cuda" for tensorrt, else "cpu"); dtype (torch only): the
        weights' dtype (default: float32 on a CPU, bfloat16 on CUDA); providers (onnxruntime only):
        execution providers; fused_cache (torch only): see TorchRunner; image_cache_mb: keep up to this many
        MB of image embeddings for images seen again (0 = none).
        """
        if not isinstance(path, (str, Path)):
            raise ValueError(f"path must be an engines folder (or a checkpoint folder for backend 'torch') as a str "
                             f"or Path, got {path!r}")
        if not isinstance(image_cache_mb, (int, float)) or isinstance(image_cache_mb, bool) \
                or not 0 <= image_cache_mb < float("inf"):
            raise ValueError(f"image_cache_mb must be a number of MB >= 0, got {image_cache_mb!r}")
        cache = ImageEmbeddingCache(int(image_cache_mb * 2**20)) if image_cache_mb > 0 else None
        if backend == "onnxruntime":
            from .ort_runner import OnnxRuntimeRunner

            return cls(OnnxRuntimeRunner(path, device or "cpu", providers), cache)
        if backend == "tensorrt":
            from .trt_runner import TensorRTRunner

            return cls(TensorRTRunner(path, device or "cuda"), cache)
        if backend == "torch":
            from .torch_runner import TorchRunner

            return cls(TorchRunner(path, device or "cpu", dtype, fused_cache), cache)
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")

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

        stats: nfe (denoiser calls) = full_forwards + cached_forwards, steps, seconds, tokens_per_second
        (answer tokens of the batch / seconds), batch_size, prompt_lengths, stage_seconds {preprocess,
        vision, projector, full_forward, cached_forward, remasking, other (the rest)} and engine_seconds
        (vision + projector + full and cached forwards). A batch's results share its stats.
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
        decoder = self._prepare(requests, config)
        for answers in decoder:
            if on_step is not None:
                on_step(self._partial_text(answers[0]))
        results = self._results(decoder)
        return results if batched else results[0]

    def stream(self, prompt, image: ImageLike | Sequence[ImageLike] | None = None,
               config: GenerationConfig | None = None) -> "Stream":
        """Iterate over the partially decoded answer after each step; `.result` holds the result at the end."""
        return Stream(self, self._prepare([self._request(prompt, image)], config))

    def chat(self, config: GenerationConfig | None = None, system: str | None = None) -> "Conversation":
        from .chat import Conversation

        return Conversation(self, config, system)

    # ---- the loop -----------------------------------------------------------------------------------

    @staticmethod
    def _request(prompt, image) -> Request:
        if isinstance(prompt, Request):
            if image is not None:
                raise ValueError("a Request carries its own image: do not pass image= as well")
            return prompt
        return Request(prompt, image)

    def _prepare(self, requests: list[Request], config: GenerationConfig | None) -> Decoder:
        """Prompt embeddings of every request, left-padded into one batch, and the loop over it."""
        cfg = GenerationConfig() if config is None else config
        if not isinstance(cfg, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(cfg).__name__}")
        runner = self.runner
        timer = StageTimer(runner.device)
        with timer("preprocess"):
            prepared = [self.prepare(request) for request in requests]
        prompts = self.embed_prompts(prepared, timer)
        self.check_fits([len(prompt) for prompt in prompts], cfg)
        batch = Batch.left_padded(prompts, cfg.gen_length, self.special.mask, runner)
        return Decoder(runner, batch, cfg, self.special, self.banned_ids, timer)

    def prepare(self, request: Request) -> PreparedRequest:
        """The request's prompt ids and decoded images: the CPU work before the engines, safe on any thread."""
        return prepare(request, self.tokenizer, self.runner.config.has_vision)

    def embed_prompts(self, requests: list[Request | PreparedRequest], timer: StageTimer) -> list[torch.Tensor]:
        """Each request's prompt [Lp, C], its images spliced in (all images through one vision call)."""
        prepared = [r if isinstance(r, PreparedRequest) else self.prepare(r) for r in requests]
        images = image_embeddings(prepared, self.runner, timer, self.image_cache)
        return [prompt_embeddings(p.ids, im, self.runner) for p, im in zip(prepared, images)]

    def _results(self, decoder: Decoder) -> list[GenerationResult]:
        seconds = decoder.timer.elapsed()
        results = [self._result(answer) for answer in decoder.answers]
        counts = decoder.counts
        stats = {"nfe": counts["full_forwards"] + counts["cached_forwards"], **counts, "seconds": seconds,
                 "tokens_per_second": sum(len(res.token_ids) for res in results) / seconds,
                 "batch_size": len(results), "prompt_lengths": decoder.batch.prompt_lengths,
                 **decoder.timer.stats(seconds)}
        for res in results:
            res.stats = copy.deepcopy(stats)
        return results

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

    def _result(self, answer: list[int]) -> GenerationResult:
        ids = answer[:stop_position(answer, self.special.eot)]
        return GenerationResult(self.tokenizer.decode(ids, skip_special_tokens=True), ids)

    def _partial_text(self, answer: list[int]) -> str:
        """The answer decoded up to its first still-masked position or <|eot_id|>."""
        return self.tokenizer.decode(final_prefix(answer, self.special), skip_special_tokens=True)


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
                self.result = self._pipeline._results(self._decoder)[0]
                if self._on_done is not None:
                    self._on_done(self.result)
            raise
        return self._pipeline._partial_text(answers[0])
