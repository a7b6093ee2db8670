"""When a row's cache is refreshed: a full forward that rewrites its keys and values, instead of a cheap cached pass
against the ones a full forward wrote earlier. Every policy refreshes at the start of every block; in between:

- `interval` (Fast-dLLM's, as adapted in LLaDA-V): at every step index within the block that is a multiple of
  `refresh_interval`.
- `committed`: once `refresh_interval` tokens have been committed since the last refresh. With one token per step
  it is `interval`; with threshold decoding a step that commits many tokens, and so changes the context the cached
  keys were computed from, is followed by a refresh at once, and a run of steps that commit one each is not.
- `drift` (after Elastic-Cache, arXiv 2510.14973, adapted to what an engine computes): once the keys of the block's
  still-masked positions in the deeper half of the layers have drifted by more than `drift_threshold` (their mean
  relative L2 change since the last refresh, measured on every cached pass from the queries' own fresh keys), or
  `refresh_interval` steps have passed. Those positions' keys change only through what they attend to, so their
  drift measures how far the context has moved on from the cache; Elastic-Cache finds deeper layers drift most.

A policy that refreshes every step (`refresh_interval` 1, for every policy) is the uncached loop, token for token.
To add a policy: a class with `needs_drift` and `should_refresh(signals)` here, its name in config.REFRESH_POLICIES
and make_policy (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RowSignals:
    """What a row's decoding has done since its cache was last refreshed, kept by the loop for its policy."""

    step: int = 0  # the step index within the current block
    steps_since_refresh: int = 0
    committed_since_refresh: int = 0
    drift: float | None = None  # the last cached pass's key drift (KeyDrift only)


class RefreshPolicy(Protocol):
    needs_drift: bool  # whether the loop must measure the keys' drift on every cached pass

    def should_refresh(self, signals: RowSignals) -> bool:
        ...


class FixedInterval:
    needs_drift = False

    def __init__(self, interval: int):
        self.interval = interval

    def should_refresh(self, signals: RowSignals) -> bool:
        return signals.step % self.interval == 0


class CommittedTokens:
    needs_drift = False

    def __init__(self, tokens: int):
        self.tokens = tokens

    def should_refresh(self, signals: RowSignals) -> bool:
        return signals.step == 0 or signals.committed_since_refresh >= self.tokens


class KeyDrift:
    needs_drift = True

    def __init__(self, threshold: float, max_interval: int, num_layers: int):
        self.threshold, self.max_interval = threshold, max_interval
        self.layers = slice(num_layers // 2, num_layers)  # the deeper half

    def should_refresh(self, signals: RowSignals) -> bool:
        return (signals.step == 0 or signals.steps_since_refresh >= self.max_interval
                or signals.drift is not None and signals.drift > self.threshold)


def make_policy(cfg, num_layers: int) -> RefreshPolicy:
    """The policy a GenerationConfig names, with its parameters."""
    if cfg.refresh == "committed":
        return CommittedTokens(cfg.refresh_interval)
    if cfg.refresh == "drift":
        return KeyDrift(cfg.drift_threshold, cfg.refresh_interval, num_layers)
    return FixedInterval(cfg.refresh_interval)
