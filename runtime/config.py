"""GenerationConfig: the settings of one generate call, checked when built (DESIGN §3–§5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

REMASKING = ("low_confidence", "random")
CACHE_MODES = ("none", "prefix", "dual")
REFRESH_POLICIES = ("interval", "committed", "drift")


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode an answer.

    gen_length: answer positions (masks) appended to the prompt.
    block_length: decoded left to right in blocks of this many positions (gen_length % block_length == 0).
    steps: denoising steps over the whole answer, spread evenly over the blocks; None = gen_length
        (one token per step), which is also the most: a step commits at least one token and a block ends when
        its masks run out, so more steps than positions never run. Ignored when `threshold` is set: a block
        then ends when it has no masks left.
    temperature: 0 = argmax; > 0 adds temperature * Gumbel noise drawn from a generator seeded with `seed`.
    remasking: "low_confidence" (commit the most confident candidates) or "random".
    cache: "none" (a full forward every step), "prefix" or "dual" (DESIGN §4).
    refresh: with a cache, when a full forward refreshes it (runtime/generation/refresh.py); every policy
        refreshes at the start of every block, and in between:
        "interval": at every step index within the block that is a multiple of refresh_interval (LLaDA-V's rule);
        "committed": once refresh_interval tokens have been committed since the last refresh;
        "drift": once the keys of the block's masked positions have drifted by more than drift_threshold, or
        refresh_interval steps have passed.
    refresh_interval: steps ("interval"), tokens ("committed") or the most steps ("drift") between refreshes;
        1 = a full forward every step, the uncached answer token for token. The default 4 keeps three of every
        four steps cheap while refreshing often enough that answers stay close to the uncached ones; the
        LLaDA-V paper measured intervals from 2 to 48.
    drift_threshold: refresh="drift" only: the mean relative change of the masked positions' keys (in the deeper
        half of the layers) that triggers a refresh. The default 0.06 is where answers on the shipped model stopped
        changing (README, Benchmarks); calibrate it on your model with benchmarks.refresh_interval.
    threshold: None, or parallel decoding: commit every candidate more confident than this
        (and at least the most confident one).
    seed: seeds the per-request generator of the Gumbel noise and of random remasking; in [0, 2**64).
    """

    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cache: str = "none"
    refresh: str = "interval"
    refresh_interval: int = 4
    drift_threshold: float = 0.06
    threshold: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", self.gen_length)
        for name in ("gen_length", "block_length", "steps", "refresh_interval", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.gen_length < 1 or self.block_length < 1:
            raise ValueError(f"gen_length and block_length must be >= 1, got {self.gen_length} and {self.block_length}")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}: "
                             f"change one so that block_length divides gen_length")
        if self.steps < 1 or self.steps % self.num_blocks:
            raise ValueError(f"steps {self.steps} must be a positive multiple of the number of blocks "
                             f"{self.num_blocks} (gen_length / block_length), e.g. steps={self.num_blocks * 4}")
        if self.steps > self.gen_length:
            raise ValueError(f"steps {self.steps} is more than gen_length {self.gen_length}: a step commits at least "
                             f"one token, so steps beyond gen_length never run (the answer is the one steps="
                             f"{self.gen_length} gives); use steps <= gen_length")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64) (a torch generator's range), got {self.seed}")
        if self.remasking not in REMASKING:
            raise ValueError(f"unknown remasking {self.remasking!r}: use one of {', '.join(REMASKING)}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"unknown cache mode {self.cache!r}: use one of {', '.join(CACHE_MODES)}")
        if self.refresh not in REFRESH_POLICIES:
            raise ValueError(f"unknown refresh policy {self.refresh!r}: use one of {', '.join(REFRESH_POLICIES)}")
        if self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1 (1 = refresh every step), got {self.refresh_interval}")
        if not isinstance(self.drift_threshold, (int, float)) or isinstance(self.drift_threshold, bool) \
                or not 0 < self.drift_threshold < math.inf:
            raise ValueError(f"drift_threshold must be a finite number > 0, got {self.drift_threshold!r}")
        if self.threshold is not None:
            if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                    or not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must be None or a number in (0, 1], got {self.threshold!r}")
            if self.remasking != "low_confidence":
                raise ValueError("threshold compares model confidences: use it with remasking='low_confidence'")

    @classmethod
    def official(cls, gen_length: int = 128) -> "GenerationConfig":
        """The official LLaDA-V demo's decoding (train/generate_demo.py): one block of `gen_length` decoded one
        token per step (steps = gen_length = block_length = 128), temperature 0, low-confidence remasking, no
        cache: the answers the official code gives (docs/fidelity.md)."""
        return cls(gen_length=gen_length, block_length=gen_length, steps=gen_length)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks
