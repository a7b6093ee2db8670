"""The diffusion loop (DESIGN §3) with the refresh-interval cache (§4), over a batch of left-padded rows.

Every row keeps its own block, step, commit schedule and generator, and a row that is done drops out,
so each row decodes exactly as it would alone. Between steps, rows can join (`admit`) and leave
(`retire`): the batch is left-padded anew to its longest prompt, which only shifts each row's slots, so
a row's positions, cache contents and answer are what they were (iteration-level batching).
Rows in step share one denoiser call per kind: one full forward for the rows that refresh (or have no
cache), one cached forward per block for the others (rows sit in different blocks with `threshold`,
where blocks end when their masks run out, or when they joined at different steps).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby

import torch

from llada_v import SpecialTokens

from .config import GenerationConfig
from .kv_cache import KVCache, layer_aligned
from .remasking import Remasker, transfer_schedule
from .runner import Runner, on_device

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

    def prompt(self, row: int) -> torch.Tensor:
        """Row `row`'s prompt embeddings [Lp, C], without its left padding."""
        return self.embeds[row, self.gen_start - self.prompt_lengths[row]:self.gen_start]

    def place(self, row: int, prompt: torch.Tensor, mask_id: int) -> None:
        """Row `row` becomes a new row for `prompt` (which fits in front of gen_start), all masks."""
        first = self.gen_start - len(prompt)
        self.embeds[row].zero_()
        self.embeds[row, first:self.gen_start] = prompt
        self.attention_mask[row] = 0
        self.attention_mask[row, first:] = 1
        self.position_ids[row] = (self.attention_mask[row].cumsum(0) - 1).clamp(min=0)
        self.tokens[row] = mask_id
        self.prompt_lengths[row] = len(prompt)

    def regrouped(self, keep: list[int], prompts: list[torch.Tensor], mask_id: int, runner: Runner) -> "Batch":
        """Rows `keep` of this batch (their answers so far) followed by new rows for `prompts`, left-padded anew."""
        batch = Batch.left_padded([self.prompt(r) for r in keep] + prompts, self.tokens.shape[1], mask_id, runner)
        batch.tokens[:len(keep)] = self.tokens[keep]
        return batch

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
    free: bool = False  # retired: the place waits for a new row
    full_forwards: int = 0  # denoiser calls this row took part in
    cached_forwards: int = 0

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
    """Iterating runs the steps; after each one it yields every row's answer ids (masks included).

    seeds: one per row (default: every row cfg.seed); the settings other than the seed are the batch's.
    tags: per row, what it stands for (Decoder.tags; default None).
    full_pass_per_row: run full passes one row at a time (default: runner.full_pass_per_row).
    """

    def __init__(self, runner: Runner, batch: Batch, cfg: GenerationConfig, special: SpecialTokens,
                 banned_ids: torch.Tensor, timer: "StageTimer", seeds: list[int] | None = None,
                 tags: list | None = None, full_pass_per_row: bool | None = None):
        self.runner, self.batch, self.cfg, self.special, self.timer = runner, batch, cfg, special, timer
        self.full_pass_per_row = runner.full_pass_per_row if full_pass_per_row is None else full_pass_per_row
        self.cache = None
        if cfg.cache != "none":
            self.cache = KVCache(cfg.cache, cfg.refresh_interval, self._cache_shape(batch), runner.dtype,
                                 runner.device)
        seeds = [cfg.seed] * batch.size if seeds is None else seeds
        self.generators = [torch.Generator(runner.device).manual_seed(seed) for seed in seeds]
        self.remasker = Remasker(cfg, banned_ids)
        self.rows = [RowState() for _ in range(batch.size)]
        # Per row, what it stands for (None: a free place, or unused).
        self.tags: list = [None] * batch.size if tags is None else list(tags)
        self.counts = {"full_forwards": 0, "cached_forwards": 0, "steps": 0}
        self.offsets = torch.arange(cfg.block_length, device=runner.device)
        self.answers = batch.tokens.tolist()

    def __iter__(self):
        while self.step():
            yield self.answers

    def step(self) -> bool:
        """One step of every row still decoding; False (and nothing run) when none is."""
        active = [r for r, row in enumerate(self.rows) if not row.done]
        if not active:
            return False
        # The thread setting is process-wide: set around each step, never across a yield, so an abandoned
        # iterator (a stream the caller stops reading) leaves it as it was.
        with torch_threads(self.runner.loop_threads), on_device(self.runner.device):
            self._step(active)
        return True

    def admit(self, prompts: list[torch.Tensor], seeds: list[int], tags: list | None = None) -> None:
        """New rows, starting at their first step (a full forward, which fills their cache). A new row takes
        a retired row's place when its prompt fits in front of the answers, and nothing else moves;
        otherwise the batch is left-padded anew to its longest prompt (and loses its free places).
        tags: what each new row stands for (Decoder.tags), e.g. the scheduler's job."""
        tags = [None] * len(prompts) if tags is None else tags
        free = [r for r, row in enumerate(self.rows) if row.free]
        rest = []
        for prompt, seed, tag in zip(prompts, seeds, tags):
            if not free or len(prompt) > self.batch.gen_start:
                rest.append((prompt, seed, tag))
                continue
            r = free.pop(0)
            self.batch.place(r, prompt, self.special.mask)
            if self.cache is not None:
                self.cache.keys[:, r].zero_()
                self.cache.values[:, r].zero_()
            self.generators[r] = torch.Generator(self.runner.device).manual_seed(seed)
            self.rows[r], self.tags[r] = RowState(), tag
        if rest:
            self._regroup([r for r, row in enumerate(self.rows) if not row.free], *map(list, zip(*rest)))
        else:
            self.answers = self.batch.tokens.tolist()

    def retire(self, rows: list[int]) -> None:
        """Free `rows` (finished or abandoned): they take no part in any step, and their places go to new rows;
        when more than half the places are free, the batch shrinks to the others (in their order)."""
        for r in rows:
            self.rows[r], self.tags[r] = RowState(done=True, free=True), None
        keep = [r for r, row in enumerate(self.rows) if not row.free]
        if keep and len(keep) * 2 < self.batch.size:
            self._regroup(keep, [], [], [])

    def _regroup(self, keep: list[int], prompts: list[torch.Tensor], seeds: list[int], tags: list) -> None:
        """Rows `keep`, then new rows for `prompts`, left-padded anew (the batch, the cache and each row's state)."""
        old = self.batch
        self.batch = old.regrouped(keep, prompts, self.special.mask, self.runner)
        if self.cache is not None:
            # Every row ends with the same answer span, so the kept rows' slots move together: copy the
            # last `span` slots (the new layout's padding in front stays zeros, and masked).
            keys, values = self.cache.keys, self.cache.values
            self.cache.keys, self.cache.values = (layer_aligned(self._cache_shape(self.batch), keys.dtype, keys.device)
                                                  for _ in range(2))
            span = min(old.length, self.batch.length)
            index = torch.tensor(keep, dtype=torch.int64, device=keys.device)
            for new, previous in ((self.cache.keys, keys), (self.cache.values, values)):
                new[:, :len(keep), :, -span:] = previous.index_select(1, index)[:, :, :, -span:]
        self.generators = [self.generators[r] for r in keep] + \
            [torch.Generator(self.runner.device).manual_seed(seed) for seed in seeds]
        self.rows = [self.rows[r] for r in keep] + [RowState() for _ in prompts]
        self.tags = [self.tags[r] for r in keep] + list(tags)
        self.answers = self.batch.tokens.tolist()

    def _cache_shape(self, batch: Batch) -> tuple[int, int, int, int, int]:
        lm = self.runner.config.language
        return lm.num_hidden_layers, batch.size, lm.num_attention_heads, batch.length, lm.head_dim

    def _step(self, active: list[int]) -> None:
        width, mask_id = self.cfg.block_length, self.special.mask
        for r in active:
            row = self.rows[r]
            if row.schedule is None:
                masked = self.answers[r][row.block * width:(row.block + 1) * width].count(mask_id)
                row.schedule = transfer_schedule(masked, self.cfg.steps_per_block)
        self.batch.embed_answers(self.runner)
        refresh = [r for r in active if self.cache is None or self.cache.should_refresh(self.rows[r].step)]
        pieces = self._full_forward(refresh) if refresh else []
        reuse = sorted((r for r in active if r not in refresh), key=lambda r: self.rows[r].block)
        for block, group in groupby(reuse, key=lambda r: self.rows[r].block):
            group = list(group)
            # Gathering some rows of the cache copies all of theirs. When every active row is in this block
            # (the others refreshed, or rest: done, or free places), the call takes every row instead and
            # keeps the group's logits: the slots it may write are the block's, which the rows that
            # refreshed never read before their next refresh rewrites them.
            if all(self.rows[r].block == block for r in active):
                pieces.append(self._cached_forward(block, list(range(self.batch.size)), keep=group))
            else:
                pieces.append(self._cached_forward(block, group))
        self._commit(pieces)
        self.counts["steps"] += 1

    def _block_start(self, block: int) -> int:
        return self.batch.gen_start + block * self.cfg.block_length

    def _full_forward(self, rows: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        """The whole sequence; logits for each row's current block; its K/V refresh the cache. One call over
        the rows, or one per row over its own unpadded span (runner.full_pass_per_row), which is how the row
        runs alone."""
        if not self.full_pass_per_row or len(rows) == 1 and self.batch.size == 1:
            return [self._full_forward_batched(rows)]
        return [self._full_forward_row(r) for r in rows]

    def _full_forward_batched(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        starts = torch.tensor([self._block_start(self.rows[r].block) for r in rows], device=self.runner.device)
        index = self.batch.rows_index(rows)
        # When every row refreshes, the runner writes the presents straight into the cache's buffers.
        in_place = self.cache is not None and index is None
        buffers = (self.cache.keys, self.cache.values) if in_place else ()
        with self.timer("full_forward"):
            if self.cache is None:
                logits = self.runner.denoise_logits(*self.batch.select(rows), starts[:, None] + self.offsets)
            else:
                logits, keys, values = self.runner.denoise_full(*self.batch.select(rows),
                                                                starts[:, None] + self.offsets, *buffers)
                if not in_place:
                    self.cache.update(keys, values, index)
        self._count_call("full_forwards", rows)
        return rows, logits

    def _full_forward_row(self, r: int) -> tuple[list[int], torch.Tensor]:
        first = self.batch.gen_start - self.batch.prompt_lengths[r]  # the row's first real slot
        span = slice(r, r + 1), slice(first, None)
        logits_index = (self._block_start(self.rows[r].block) - first + self.offsets)[None]
        inputs = self.batch.embeds[span], self.batch.position_ids[span], self.batch.attention_mask[span], logits_index
        with self.timer("full_forward"):
            if self.cache is None:
                logits = self.runner.denoise_logits(*inputs)
            else:
                logits, keys, values = self.runner.denoise_full(*inputs)
                self.cache.keys[:, r, :, first:] = keys[:, 0]
                self.cache.values[:, r, :, first:] = values[:, 0]
        self._count_call("full_forwards", [r])
        return [r], logits

    def _cached_forward(self, block: int, rows: list[int], keep: list[int] | None = None):
        """The block (dual) or the block and what follows (prefix) against the cache; logits for the block of
        `keep` (default: every row in `rows`)."""
        start = self._block_start(block)
        end = self.cache.query_end(start + self.cfg.block_length)
        embeds, positions, mask = self.batch.select(rows)
        past_keys, past_values = self.cache.buffers(self.batch.rows_index(rows))
        with self.timer("cached_forward"):
            logits = self.runner.denoise_cached(
                embeds[:, start:end], positions[:, start:end], mask[:, start:end],
                self.offsets.expand(len(rows), -1), past_keys, past_values, self.cache.past_mask(mask, start, end),
                start)
        if keep is not None:
            logits = logits[torch.tensor([rows.index(r) for r in keep], device=logits.device)]
            rows = keep
        self._count_call("cached_forwards", rows)
        return rows, logits

    def _count_call(self, kind: str, rows: list[int]) -> None:
        self.counts[kind] += 1
        for r in rows:
            setattr(self.rows[r], kind, getattr(self.rows[r], kind) + 1)

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


def final_prefix(answer: list[int], special: SpecialTokens) -> list[int]:
    """The part of a partly decoded answer that can no longer change: up to its first mask or <|eot_id|>."""
    end = stop_position(answer, special.eot)
    return answer[:answer.index(special.mask)] if special.mask in answer[:end] else answer[:end]


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
    """Time per stage. On CUDA the device's stages are timed with CUDA events recorded on torch's stream, read
    once when the stats are made: timing never synchronises the device between steps. Preprocessing runs on the
    host and is timed by the host clock."""

    HOST_STAGES = ("preprocess",)

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    @contextmanager
    def __call__(self, stage: str):
        if self.device.type != "cuda" or stage in self.HOST_STAGES:
            start = time.perf_counter()
            yield
            self.totals[stage] += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(torch.cuda.current_stream(self.device))
        yield
        end.record(torch.cuda.current_stream(self.device))
        self.events.append((stage, begin, end))

    def stats(self, total: float) -> dict:
        for stage, begin, end in self.events:
            end.synchronize()
            self.totals[stage] += begin.elapsed_time(end) / 1e3
        self.events.clear()
        stages = {**self.totals, "other": max(total - sum(self.totals.values()), 0.0)}
        return {"stage_seconds": stages, "engine_seconds": sum(self.totals[s] for s in ENGINE_STAGES)}
