"""GenerationConfig: defaults and one clear error per impossible setting."""

import pytest

from runtime import GenerationConfig


def test_defaults():
    cfg = GenerationConfig()
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.temperature) == (128, 32, 128, 0.0)
    assert (cfg.remasking, cfg.cache, cfg.threshold, cfg.seed) == ("low_confidence", "none", None, 0)
    assert cfg.refresh_interval >= 1
    assert (cfg.num_blocks, cfg.steps_per_block) == (4, 32)


def test_steps_default_follows_gen_length():
    assert GenerationConfig(gen_length=64, block_length=16).steps == 64
    assert GenerationConfig(gen_length=64, block_length=16, steps=8).steps_per_block == 2


@pytest.mark.parametrize("settings, match", [
    (dict(gen_length=100, block_length=32), "not a multiple of block_length"),
    (dict(gen_length=64, block_length=16, steps=6), "multiple of the number of blocks 4"),
    (dict(steps=0), "positive multiple"),
    (dict(gen_length=64, block_length=16, steps=128), "steps 128 is more than gen_length 64"),
    (dict(steps=10**10), "steps beyond gen_length never run"),  # no list of 10**10 per-step counts is built
    (dict(gen_length=0), "gen_length and block_length must be >= 1"),
    (dict(block_length=-32), "gen_length and block_length must be >= 1"),
    (dict(refresh_interval=0), "refresh_interval must be >= 1"),
    (dict(refresh="adaptive"), "unknown refresh policy 'adaptive': use one of interval, committed, drift"),
    (dict(drift_threshold=0), "drift_threshold must be a finite number > 0"),
    (dict(drift_threshold=float("inf")), "drift_threshold must be a finite number > 0"),
    (dict(threshold=0.0), r"threshold must be None or a number in \(0, 1\]"),
    (dict(threshold=1.5), r"threshold must be None or a number in \(0, 1\]"),
    (dict(threshold=0.9, remasking="random"), "use it with remasking='low_confidence'"),
    (dict(cache="full"), "unknown cache mode 'full': use one of none, prefix, dual"),
    (dict(remasking="top_k"), "unknown remasking 'top_k': use one of low_confidence, random"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(seed=2**64), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
    (dict(gen_length=64.0), "gen_length must be an integer"),
    (dict(seed=None), "seed must be an integer"),
])
def test_impossible_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**settings)


def test_threshold_one_is_allowed():
    assert GenerationConfig(threshold=1.0).threshold == 1.0


def test_official_settings_are_the_official_demos():
    cfg = GenerationConfig.official()
    assert (cfg.gen_length, cfg.block_length, cfg.steps, cfg.temperature) == (128, 128, 128, 0.0)
    assert (cfg.remasking, cfg.cache, cfg.threshold) == ("low_confidence", "none", None)
    assert GenerationConfig.official(gen_length=16) == GenerationConfig(gen_length=16, block_length=16, steps=16)
