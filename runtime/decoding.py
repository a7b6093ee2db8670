"""The diffusion loop (DESIGN §3) with the refresh-interval cache (§4), over a batch of left-padded rows.

Every row keeps its own block, step, commit schedule and generator, and a row that is done drops out,
so each row decodes exactly as it would alone. Rows in step share one denoiser call per kind: one full
forward for the rows that refresh (or have no cache), one cached forward per block for the others
(rows only sit in different blocks with `threshold`, where blocks end when their masks run out).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby

import torch

from llada_v import SpecialTokens

from .config import GenerationConfig
from .kv_cache import KVCache
from .remasking import Remasker, transfer_schedule
from .runner import Runner

STAGES = ("preprocess", "vision", "projector", "full_forward", "cached_forward", "remasking")
ENGINE_STAGES = ("vision", "projector", "full_forward", "cached_forward")


class Batch:
    """Left-padded prompt embeddings followed by the answer positions, for B rows on the runner's device."""

    def __init__(self, embeds, attention_mask, tokens, gen_start: int):
        self.embeds = embeds  # [B, L, C]
        self.attention_mask = attention_mask  # [B, L] int64, 0 on left padding
        self.position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # from 0 at each row's first real token
        self.tokens = tokens  # [B, G] answer ids, the mask id where still masked
        self.gen_start = gen_start
        self.prompt_lengths = attention_mask[:, :gen_start].sum(1).tolist()

    @classmethod
    def left_padded(cls, prompts: list[torch.Tensor], gen_length: int, mask_id: int, runner: Runner) -> "Batch":
        prompt_length = max(len(p) for p in prompts)
        length, n_rows = prompt_length + gen_length, len(prompts)
        embeds = torch.zeros((n_rows, length, prompts[0].shape[-1]), dtype=runner.dtype, device=runner.device)
        mask = torch.zeros((n_rows, length), dtype=torch.int64, device=runner.device)
        for r, prompt in enumerate(prompts):
            embeds[r, prompt_length - len(prompt):prompt_length] = prompt
            mask[r, prompt_length - len(prompt):] = 1
        tokens = torch.full((n_rows, gen_length), mask_id, dtype=torch.int64, device=runner.device)
        return cls(embeds, mask, tokens, prompt_length)

    @property
    def size(self) -> int:
        return self.embeds.shape[0]

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def embed_answers(self, runner: Runner) -> None:
        self.embeds[:, self.gen_start:] = runner.embed(self.tokens)

    def rows_index(self, rows: list[int], always: bool = False) -> torch.Tensor | None:
        """Index tensor of `rows`, or None when they are all rows in order (then no gather is needed)."""
        if not always and rows == list(range(self.size)):
            return None
        return torch.tensor(rows, dtype=torch.int64, device=self.embeds.device)

    def select(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = self.rows_index(rows)
        tensors = (self.embeds, self.position_ids, self.attention_mask)
        return tensors if index is None else tuple(t.index_select(0, index) for t in tensors)


@dataclass
class RowState:
    """Where one row is: its block, the step within it and that block's commit schedule."""

    block: int = 0
    step: int = 0
    schedule: list[int] | None = None  # None until the block starts
    done: bool = False

    def advance(self, answer: list[int], cfg: GenerationConfig, special: SpecialTokens) -> None:
        self.step += 1
        stop = stop_position(answer, special.eot)
        if stop < len(answer) and special.mask not in answer[:stop]:
            self.done = True  # early exit: <|eot_id|> is committed and everything before it is filled
            return
        block = answer[self.block * cfg.block_length:(self.block + 1) * cfg.block_length]
        # A block ends when it has no masks left (the official loop leaves it at once, no no-op steps),
        # or after its steps unless `threshold` decodes it.
        if special.mask not in block or (cfg.threshold is None and self.step == cfg.steps_per_block):
            self.block, self.step, self.schedule = self.block + 1, 0, None
            self.done = self.block == cfg.num_blocks


class Decoder:
    """Iterating runs the steps; after each one it yields every row's answer ids (masks included)."""

    def __init__(self, runner: Runner, batch: Batch, cfg: GenerationConfig, special: SpecialTokens,
                 banned_ids: torch.Tensor, timer: "StageTimer"):
        self.runner, self.batch, self.cfg, self.special, self.timer = runner, batch, cfg, special, timer
        lm = runner.config.language
        self.cache = None
        if cfg.cache != "none":
            shape = (lm.num_hidden_layers, batch.size, lm.num_attention_heads, batch.length, lm.head_dim)
            self.cache = KVCache(cfg.cache, cfg.refresh_interval, shape, runner.dtype, runner.device)
        self.generators = [torch.Generator(runner.device).manual_seed(cfg.seed) for _ in range(batch.size)]
        self.remasker = Remasker(cfg, banned_ids)
        self.rows = [RowState() for _ in range(batch.size)]
        self.counts = {"full_forwards": 0, "cached_forwards": 0, "steps": 0}
        self.offsets = torch.arange(cfg.block_length, device=runner.device)
        self.answers = batch.tokens.tolist()

    def __iter__(self):
        # The thread setting is process-wide: set around each step, never across a yield, so an abandoned
        # iterator (a stream the caller stops reading) leaves it as it was.
        while active := [r for r, row in enumerate(self.rows) if not row.done]:
            with torch_threads(self.runner.loop_threads):
                self._step(active)
            yield self.answers

    def _step(self, active: list[int]) -> None:
        width, mask_id = self.cfg.block_length, self.special.mask
        for r in active:
            row = self.rows[r]
            if row.schedule is None:
                masked = self.answers[r][row.block * width:(row.block + 1) * width].count(mask_id)
                row.schedule = transfer_schedule(masked, self.cfg.steps_per_block)
        self.batch.embed_answers(self.runner)
        refresh = [r for r in active if self.cache is None or self.cache.should_refresh(self.rows[r].step)]
        pieces = [self._full_forward(refresh)] if refresh else []
        reuse = sorted((r for r in active if r not in refresh), key=lambda r: self.rows[r].block)
        pieces += [self._cached_forward(block, list(group))
                   for block, group in groupby(reuse, key=lambda r: self.rows[r].block)]
        self._commit(pieces)
        self.counts["steps"] += 1

    def _block_start(self, block: int) -> int:
        return self.batch.gen_start + block * self.cfg.block_length

    def _full_forward(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        """The whole sequence; logits for each row's current block; its K/V refresh the cache."""
        starts = torch.tensor([self._block_start(self.rows[r].block) for r in rows], device=self.runner.device)
        index = self.batch.rows_index(rows)
        # When every row refreshes, the runner writes the presents straight into the cache's buffers.
        in_place = self.cache is not None and index is None
        buffers = (self.cache.keys, self.cache.values) if in_place else ()
        with self.timer("full_forward"):
            logits, keys, values = self.runner.denoise_full(*self.batch.select(rows), starts[:, None] + self.offsets,
                                                            *buffers)
            if self.cache is not None and not in_place:
                self.cache.update(keys, values, index)
        self.counts["full_forwards"] += 1
        return rows, logits

    def _cached_forward(self, block: int, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        """The block (dual) or the block and what follows (prefix) against the cache; logits for the block."""
        start = self._block_start(block)
        end = self.cache.query_end(start + self.cfg.block_length)
        embeds, positions, mask = self.batch.select(rows)
        past_keys, past_values = self.cache.buffers(self.batch.rows_index(rows))
        with self.timer("cached_forward"):
            logits = self.runner.denoise_cached(
                embeds[:, start:end], positions[:, start:end], mask[:, start:end],
                self.offsets.expand(len(rows), -1), past_keys, past_values, self.cache.past_mask(mask, start, end),
                start)
        self.counts["cached_forwards"] += 1
        return rows, logits

    def _commit(self, pieces: list[tuple[list[int], torch.Tensor]]) -> None:
        rows = [r for group, _ in pieces for r in group]
        cfg, device = self.cfg, self.runner.device
        with self.timer("remasking"):
            logits = torch.cat([logits for _, logits in pieces]) if len(pieces) > 1 else pieces[0][1]
            columns = torch.tensor([self.rows[r].block * cfg.block_length for r in rows], device=device)[:, None]
            columns = columns + self.offsets
            index = self.batch.rows_index(rows, always=True)
            current = self.batch.tokens[index].gather(1, columns)
            # Once <|eot_id|> is committed, only the positions before it stay eligible (the official stop rule).
            stops = torch.tensor([stop_position(self.answers[r], self.special.eot) for r in rows], device=device)
            eligible = (current == self.special.mask) & (columns < stops[:, None])
            k = torch.tensor([0 if cfg.threshold is not None else self.rows[r].schedule[self.rows[r].step]
                              for r in rows], dtype=torch.int64, device=device)
            x0, commit = self.remasker(logits, eligible, k, [self.generators[r] for r in rows])
            self.batch.tokens[index] = self.batch.tokens[index].scatter(1, columns, torch.where(commit, x0, current))
        self.answers = self.batch.tokens.tolist()
        for r in rows:
            self.rows[r].advance(self.answers[r], cfg, self.special)


def stop_position(answer: list[int], eot: int) -> int:
    """Where the answer ends: its first <|eot_id|>, or its length while it has none."""
    return answer.index(eot) if eot in answer else len(answer)


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to `count` inside the block (process-wide), restored after."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class StageTimer:
    """Wall time per stage; on CUDA it synchronises around each stage so the times are the GPU's."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        self.sync()
        return time.perf_counter() - self.start

    @contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[stage] += time.perf_counter() - start

    def stats(self, total: float) -> dict:
        stages = {**self.totals, "other": max(total - sum(self.totals.values()), 0.0)}
        return {"stage_seconds": stages, "engine_seconds": sum(self.totals[s] for s in ENGINE_STAGES)}
