"""The diffusion loop (DESIGN §3) with the refresh-interval cache (§4), over a batch of left-padded rows.

Every row keeps its own block, step, commit schedule and generator, and a row that is done drops out,
so each row decodes exactly as it would alone. Between steps, rows can join (`admit`) and leave
(`retire`): the batch is left-padded anew to its longest prompt, which only shifts each row's slots, so
a row's positions, cache contents and answer are what they were (iteration-level batching).
Rows in step share one denoiser call per kind: one full forward for the rows that refresh (or have no
cache), one cached forward per block for the others (rows sit in different blocks with `threshold`,
where blocks end when their masks run out, or when they joined at different steps). Which rows refresh is
their cache's refresh policy's decision, on what each row has done since its last refresh (RowState.signals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import torch

from ..backends.runner import Runner, on_device
from ..config import GenerationConfig
from .batch import Batch
from .cache import KVCache, NoCache, make_cache
from .family import FamilyRules
from .refresh import RowSignals
from .remasking import Remasker, transfer_schedule
from .timing import StageTimer, torch_threads


@dataclass
class RowState:
    """Where one row is: its block, the step within it and that block's commit schedule, and what its refresh
    policy sees (signals)."""

    block: int = 0
    schedule: list[int] | None = None  # None until the block starts
    done: bool = False
    free: bool = False  # retired: the place waits for a new row
    full_forwards: int = 0  # denoiser calls this row took part in
    cached_forwards: int = 0
    signals: RowSignals = field(default_factory=RowSignals)

    @property
    def step(self) -> int:
        return self.signals.step

    def advance(self, answer: list[int], cfg: GenerationConfig, rules: FamilyRules, committed: int) -> None:
        """After a step that committed `committed` tokens of the row's answer (now `answer`)."""
        signals = self.signals
        signals.step += 1
        signals.steps_since_refresh += 1
        signals.committed_since_refresh += committed
        mask = rules.special.mask
        stop = rules.stop_position(answer)
        if stop < len(answer) and mask not in answer[:stop]:
            self.done = True  # early exit: <|eot_id|> is committed and everything before it is filled
            return
        block = answer[self.block * cfg.block_length:(self.block + 1) * cfg.block_length]
        # A block ends when it has no masks left (LLaDA-V's loop leaves it at once, no no-op steps; in LLaDA's,
        # whose schedule commits the block's last masks at its last step, it never happens early),
        # or after its steps unless `threshold` decodes it.
        if mask not in block or (cfg.threshold is None and self.step == cfg.steps_per_block):
            self.block, self.schedule, signals.step = self.block + 1, None, 0
            self.done = self.block == cfg.num_blocks

    def refreshed(self) -> None:
        self.signals.steps_since_refresh = self.signals.committed_since_refresh = 0
        self.signals.drift = None


class Decoder:
    """Iterating runs the steps; after each one it yields every row's answer ids (masks included).

    rules: the model family's (banned ids, stop rule, random draws); seeds: one per row (default: every row
    cfg.seed); the settings other than the seed are the batch's. tags: per row, what it stands for (Decoder.tags;
    default None).
    """

    def __init__(self, runner: Runner, batch: Batch, cfg: GenerationConfig, rules: FamilyRules, timer: StageTimer,
                 seeds: list[int] | None = None, tags: list | None = None):
        self.runner, self.batch, self.cfg, self.rules, self.timer = runner, batch, cfg, rules, timer
        self.special = rules.special
        self.cache: NoCache | KVCache = make_cache(cfg, self._cache_shape(batch), runner.dtype, runner.device)
        seeds = [cfg.seed] * batch.size if seeds is None else seeds
        self.generators = [torch.Generator(runner.device).manual_seed(seed) for seed in seeds]
        banned_ids = torch.tensor(rules.banned, dtype=torch.int64, device=runner.device)
        self.remasker = Remasker(cfg, banned_ids, rules.draws_whole_sequence)
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
            self.cache.clear_rows([r])
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
        self.batch = self.batch.regrouped(keep, prompts, self.special.mask, self.runner)
        self.cache.regroup(keep, self._cache_shape(self.batch))
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
        refresh = [r for r in active if self.cache.refreshes(self.rows[r].signals)]
        for r in refresh:
            self.rows[r].refreshed()
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
        if not self.runner.full_pass_per_row or len(rows) == 1 and self.batch.size == 1:
            return [self._full_forward_batched(rows)]
        return [self._full_forward_row(r) for r in rows]

    def _full_forward_batched(self, rows: list[int]) -> tuple[list[int], torch.Tensor]:
        starts = torch.tensor([self._block_start(self.rows[r].block) for r in rows], device=self.runner.device)
        with self.timer("full_forward"):
            logits = self.cache.full_pass(self.runner, (*self.batch.select(rows), starts[:, None] + self.offsets),
                                          self.batch.rows_index(rows))
        self._count_call("full_forwards", rows)
        return rows, logits

    def _full_forward_row(self, r: int) -> tuple[list[int], torch.Tensor]:
        first = self.batch.gen_start - self.batch.prompt_lengths[r]  # the row's first real slot
        span = slice(r, r + 1), slice(first, None)
        logits_index = (self._block_start(self.rows[r].block) - first + self.offsets)[None]
        inputs = self.batch.embeds[span], self.batch.position_ids[span], self.batch.attention_mask[span], logits_index
        with self.timer("full_forward"):
            logits = self.cache.full_pass_of_row(self.runner, inputs, r, first)
        self._count_call("full_forwards", [r])
        return [r], logits

    def _cached_forward(self, block: int, rows: list[int], keep: list[int] | None = None):
        """The block (dual) or the block and what follows (prefix) against the cache; logits for the block of
        `keep` (default: every row in `rows`). With a drift policy, the drift of the block's masked positions'
        keys goes to each row's signals."""
        start, index = self._block_start(block), self.batch.rows_index(rows)
        end = start + self.cfg.block_length
        inputs = (*self.batch.select(rows), self.offsets.expand(len(rows), -1))
        policy = self.cache.policy
        with self.timer("cached_forward"):
            if policy.needs_drift:
                before = self.cache.block_keys(policy.layers, index, start, end)
                logits, fresh = self.cache.cached_pass(self.runner, inputs, index, start, end, with_keys=True)
                self._record_drift(rows, keep or rows, before, fresh[policy.layers, :, :, :self.cfg.block_length],
                                   block)
            else:
                logits = self.cache.cached_pass(self.runner, inputs, index, start, end)
        if keep is not None:
            logits = logits[torch.tensor([rows.index(r) for r in keep], device=logits.device)]
            rows = keep
        self._count_call("cached_forwards", rows)
        return rows, logits

    def _record_drift(self, rows: list[int], kept: list[int], before: torch.Tensor, after: torch.Tensor,
                      block: int) -> None:
        """Each kept row's mean relative change of its block's still-masked positions' keys (before/after [layers,
        len(rows), H, block, D]): how far what they attend to has moved on since the cache was written."""
        width = self.cfg.block_length
        columns = slice(block * width, (block + 1) * width)
        masked = self.batch.tokens[self.batch.rows_index(rows, always=True), columns] == self.special.mask
        change = (after.float() - before.float()).norm(dim=-1) / before.float().norm(dim=-1).clamp(min=1e-12)
        per_position = change.mean(dim=(0, 2))  # [len(rows), block]
        for i, r in enumerate(rows):
            if r in kept and bool(masked[i].any()):
                self.rows[r].signals.drift = float(per_position[i][masked[i]].mean())

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
            # Once <|eot_id|> is committed, only the positions before it stay eligible (LLaDA-V's stop rule).
            stops = torch.tensor([self.rules.stop_position(self.answers[r]) for r in rows], device=device)
            eligible = (current == self.special.mask) & (columns < stops[:, None])
            k = torch.tensor([0 if cfg.threshold is not None else self.rows[r].schedule[self.rows[r].step]
                              for r in rows], dtype=torch.int64, device=device)
            # Each row's block as positions of its own sequence (prompt, then answer) and that sequence's length.
            prompts = [self.batch.prompt_lengths[r] for r in rows]
            spans = [(p + self.rows[r].block * cfg.block_length, p + cfg.gen_length) for r, p in zip(rows, prompts)]
            x0, commit = self.remasker(logits, eligible, k, [self.generators[r] for r in rows], spans)
            self.batch.tokens[index] = self.batch.tokens[index].scatter(1, columns, torch.where(commit, x0, current))
            committed = commit.sum(dim=1).tolist()
        self.answers = self.batch.tokens.tolist()
        for r, count in zip(rows, committed):
            self.rows[r].advance(self.answers[r], cfg, self.rules, count)
