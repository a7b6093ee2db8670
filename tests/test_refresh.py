"""Refresh policies (runtime/generation/refresh.py): what each decides from a row's signals, and in the loop: every
policy refreshing every step is the uncached loop token for token, `committed` counts tokens and not steps, and
`drift` reads the keys the cached passes return."""

from dataclasses import replace

import pytest

import llada_v
from benchmarks.common import load_requests
from benchmarks.demo_model.data import LONG_TYPES
from runtime import GenerationConfig, Pipeline, Request
from runtime.config import REFRESH_POLICIES
from runtime.generation.refresh import CommittedTokens, FixedInterval, KeyDrift, RowSignals, make_policy

from test_cache import PROMPTS, SpyRunner, image


@pytest.fixture(scope="module")
def torch_pipe():
    return Pipeline.load(llada_v.SHIPPED_MODEL_DIR, backend="torch")


# ---- decisions ---------------------------------------------------------------------------------------

def test_committed_tokens_refreshes_at_block_start_and_once_enough_tokens_are_committed():
    policy = CommittedTokens(4)
    assert policy.should_refresh(RowSignals(step=0))
    assert not policy.should_refresh(RowSignals(step=3, steps_since_refresh=3, committed_since_refresh=3))
    assert policy.should_refresh(RowSignals(step=1, steps_since_refresh=1, committed_since_refresh=4))


def test_key_drift_refreshes_past_its_threshold_or_after_its_most_steps():
    policy = KeyDrift(0.1, max_interval=8, num_layers=5)
    assert policy.needs_drift and policy.layers == slice(2, 5)  # the deeper half
    assert policy.should_refresh(RowSignals(step=0))
    assert not policy.should_refresh(RowSignals(step=3, steps_since_refresh=3))  # nothing measured yet
    assert not policy.should_refresh(RowSignals(step=3, steps_since_refresh=3, drift=0.1))
    assert policy.should_refresh(RowSignals(step=3, steps_since_refresh=3, drift=0.11))
    assert policy.should_refresh(RowSignals(step=9, steps_since_refresh=8, drift=0.0))


def test_make_policy_follows_the_config():
    assert type(make_policy(GenerationConfig(), 4)) is FixedInterval
    committed = make_policy(GenerationConfig(refresh="committed", refresh_interval=6), 4)
    assert type(committed) is CommittedTokens and committed.tokens == 6
    drift = make_policy(GenerationConfig(refresh="drift", refresh_interval=16, drift_threshold=0.2), 4)
    assert (type(drift), drift.threshold, drift.max_interval, drift.layers) == (KeyDrift, 0.2, 16, slice(2, 4))


# ---- in the loop -------------------------------------------------------------------------------------

@pytest.mark.parametrize("refresh", REFRESH_POLICIES)
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.9, seed=3), dict(threshold=0.004)])
def test_every_policy_refreshing_every_step_is_the_uncached_loop(torch_pipe, refresh, mode, settings):
    base = GenerationConfig(gen_length=24, block_length=8, steps=12, **settings)
    cached_cfg = replace(base, cache=mode, refresh=refresh, refresh_interval=1, drift_threshold=1e9)
    for prompt, img in [(PROMPTS[0], None), (PROMPTS[1], image(0))]:
        uncached = torch_pipe.generate(prompt, image=img, config=base)
        cached = torch_pipe.generate(prompt, image=img, config=cached_cfg)
        assert cached.token_ids == uncached.token_ids
        assert cached.stats.cached_forwards == 0


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_committed_tokens_count_tokens_not_steps(no_eot_model_dir, mode):
    """Two tokens a step: a refresh every 4 committed tokens is a refresh every 2 steps, call for call."""
    interval = GenerationConfig(gen_length=32, block_length=16, steps=16, cache=mode, refresh_interval=2)
    committed = replace(interval, refresh="committed", refresh_interval=4)
    by_steps, by_tokens = (Pipeline(SpyRunner(no_eot_model_dir)) for _ in range(2))
    expected = by_steps.generate(PROMPTS[0], config=interval)
    got = by_tokens.generate(PROMPTS[0], config=committed)
    assert got.token_ids == expected.token_ids
    assert [call[:2] for call in by_tokens.runner.calls] == [call[:2] for call in by_steps.runner.calls]
    assert got.stats.full_forwards == 2 * 4  # two blocks of 8 steps, a refresh every other step


def test_committed_tokens_refresh_once_enough_tokens_are_committed():
    """Threshold decoding commits several tokens in a step: a refresh follows as soon as 4 have been committed since
    the last one, whatever the number of steps (one block, so the block start is step 0 only)."""
    request = next(r for r in load_requests(40, with_answers=False) if r.kind in LONG_TYPES)
    runner = SpyRunner(llada_v.SHIPPED_MODEL_DIR)
    pipe = Pipeline(runner)
    cfg = GenerationConfig(gen_length=32, block_length=32, steps=32, threshold=0.5, cache="dual",
                           refresh="committed", refresh_interval=4)
    mask, answers = pipe.special.mask, [[pipe.special.mask] * 32]
    for step in pipe.start([Request(request.prompt, request.image)], cfg):
        answers.append(list(step[0]))
    committed = [sum(a == mask != b for a, b in zip(before, after)) for before, after in zip(answers, answers[1:])]
    assert max(committed) > 1  # steps that commit several tokens: where counting tokens differs from steps
    expected, since = [], 0
    for step, count in enumerate(committed):
        refresh = step == 0 or since >= 4
        expected.append("full" if refresh else "cached")
        since = (0 if refresh else since) + count
    assert [kind for kind, *_ in runner.calls] == expected


def test_drift_never_reached_is_one_refresh_per_block(no_eot_model_dir):
    once_per_block = GenerationConfig(gen_length=32, block_length=8, steps=32, cache="dual", refresh_interval=8)
    expected = Pipeline(SpyRunner(no_eot_model_dir)).generate(PROMPTS[1], config=once_per_block)
    got = Pipeline(SpyRunner(no_eot_model_dir)).generate(
        PROMPTS[1], config=replace(once_per_block, refresh="drift", drift_threshold=1e9))
    assert got.token_ids == expected.token_ids
    assert (got.stats.full_forwards, got.stats.cached_forwards) == (4, 28)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_drift_refreshes_after_every_cached_pass_that_moved_the_keys(no_eot_model_dir, mode):
    """Each cached pass measures the masked positions' keys against the cache's: a commit moves them, so with a
    threshold of ~0 every cached pass is followed by a refresh (full, cached, full, cached, ... in every block)."""
    runner = SpyRunner(no_eot_model_dir)
    cfg = GenerationConfig(gen_length=32, block_length=8, steps=32, cache=mode, refresh="drift", refresh_interval=8,
                           drift_threshold=1e-12)
    result = Pipeline(runner).generate(PROMPTS[0], config=cfg)
    assert [kind for kind, *_ in runner.calls] == ["full", "cached"] * 16
    assert (result.stats.full_forwards, result.stats.cached_forwards) == (16, 16)


def test_drift_on_onnxruntime_decides_as_on_torch(engines_dir, torch_pipe):
    """The ONNX Runtime runner returns the graph's present keys of a cached pass: its drift decisions, and answers,
    are torch's (a threshold between the drifts a commit causes and none)."""
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, cache="dual", refresh="drift",
                           refresh_interval=8, drift_threshold=1e-6)
    with Pipeline.load(engines_dir) as ort_pipe:
        for prompt, img in [(PROMPTS[0], None), (PROMPTS[1], image(1))]:
            expected = torch_pipe.generate(prompt, image=img, config=cfg)
            got = ort_pipe.generate(prompt, image=img, config=cfg)
            assert got.token_ids == expected.token_ids
            assert (got.stats.full_forwards, got.stats.cached_forwards) == \
                (expected.stats.full_forwards, expected.stats.cached_forwards)
