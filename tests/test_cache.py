"""The refresh-interval cache: the KVCache buffers, r=1 equals no cache, the forward counts of a schedule,
and what a cached step is given (one buffer for the whole call, the right slots hidden)."""

import math

import numpy as np
import pytest
import torch

import llada_v
from runtime import GenerationConfig, Pipeline
from runtime.generation.cache import KVCache
from runtime.generation.refresh import FixedInterval, RowSignals
from runtime.backends.pytorch import TorchRunner

PROMPTS = ["What colour is the square?", "How many shapes are there? Answer with one word."]


@pytest.fixture(scope="module")
def torch_pipe():
    return Pipeline.load(llada_v.SHIPPED_MODEL_DIR, backend="torch")


def image(seed: int, size=(90, 140)) -> np.ndarray:
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


# ---- KVCache ------------------------------------------------------------------------------------------

def test_refresh_at_block_start_and_every_interval():
    cache = KVCache("dual", FixedInterval(3), (1, 1, 1, 4, 2), torch.float32, torch.device("cpu"))
    assert [s for s in range(8) if cache.refreshes(RowSignals(step=s))] == [0, 3, 6]


def test_a_full_pass_over_some_rows_writes_them_in_place():
    class Presents:  # a runner whose full pass gives keys 7 and values 8
        def denoise_full(self, *inputs):
            return "logits", torch.full((2, 2, 1, 5, 2), 7.0), torch.full((2, 2, 1, 5, 2), 8.0)

    cache = KVCache("prefix", FixedInterval(2), (2, 3, 1, 5, 2), torch.float32, torch.device("cpu"))
    keys_ptr = cache.keys.data_ptr()
    assert cache.full_pass(Presents(), (), torch.tensor([0, 2])) == "logits"
    assert cache.keys.data_ptr() == keys_ptr
    assert cache.keys[:, [0, 2]].eq(7).all() and cache.values[:, [0, 2]].eq(8).all()
    assert cache.keys[:, 1].eq(0).all() and cache.values[:, 1].eq(0).all()


@pytest.mark.parametrize("mode, expected_end", [("dual", 6), ("prefix", 10)])
def test_past_mask_hides_the_query_span(mode, expected_end):
    cache = KVCache(mode, FixedInterval(2), (1, 2, 1, 10, 2), torch.float32, torch.device("cpu"))
    attention_mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
    end = cache.query_end(6)
    assert end == expected_end
    past = cache.past_mask(attention_mask, 4, end)
    expected = attention_mask.clone()
    expected[:, 4:expected_end] = 0
    assert torch.equal(past, expected)
    assert attention_mask[0].eq(1).all()  # the batch's own mask is left alone


def test_cache_mode_must_be_prefix_or_dual():
    with pytest.raises(ValueError, match="cache mode must be 'prefix' or 'dual'"):
        KVCache("none", FixedInterval(1), (1, 1, 1, 1, 1), torch.float32, torch.device("cpu"))


# ---- in the loop -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.9, seed=3), dict(remasking="random", seed=1),
                                      dict(threshold=0.004)])
def test_refresh_interval_one_equals_no_cache(torch_pipe, mode, settings):
    base = GenerationConfig(gen_length=24, block_length=8, steps=12, **settings)
    for prompt, img in [(PROMPTS[0], None), (PROMPTS[1], image(0))]:
        uncached = torch_pipe.generate(prompt, image=img, config=base)
        cached = torch_pipe.generate(prompt, image=img, config=GenerationConfig(
            **{**base.__dict__, "cache": mode, "refresh_interval": 1}))
        assert cached.token_ids == uncached.token_ids
        assert cached.stats["cached_forwards"] == 0


class SpyRunner(TorchRunner):
    """Records every denoiser call the pipeline makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        self.calls.append(("full", inputs_embeds.shape[1], logits_index.clone(), present_keys.data_ptr(),
                           present_values.data_ptr()))
        return super()._denoise_full_impl(inputs_embeds, position_ids, attention_mask, logits_index,
                                          present_keys, present_values)

    def _denoise_logits_impl(self, inputs_embeds, position_ids, attention_mask, logits_index):
        self.calls.append(("full", inputs_embeds.shape[1], logits_index.clone(), None, None))  # no presents
        return super()._denoise_logits_impl(inputs_embeds, position_ids, attention_mask, logits_index)

    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start, with_keys):
        self.calls.append(("cached", inputs_embeds.shape[1], past_keys.data_ptr(), tuple(past_keys.shape),
                           past_mask.clone(), query_start, past_values.data_ptr()))
        return super()._denoise_cached_impl(inputs_embeds, position_ids, attention_mask, logits_index,
                                            past_keys, past_values, past_mask, query_start, with_keys)


@pytest.mark.parametrize("cache, interval, steps", [("none", 1, 16), ("dual", 3, 16), ("prefix", 2, 8),
                                                    ("dual", 8, 32), ("prefix", 5, 16)])
def test_forward_counts_follow_the_schedule(no_eot_model_dir, cache, interval, steps):
    runner = SpyRunner(no_eot_model_dir)
    pipe = Pipeline(runner)
    cfg = GenerationConfig(gen_length=32, block_length=8, steps=steps, cache=cache, refresh_interval=interval)
    result = pipe.generate(PROMPTS[0], config=cfg)
    assert len(result.token_ids) == 32  # no early exit with this model
    per_block = cfg.steps_per_block if cache == "none" else math.ceil(cfg.steps_per_block / interval)
    stats = result.stats
    assert stats["full_forwards"] == cfg.num_blocks * per_block
    assert stats["cached_forwards"] == steps - stats["full_forwards"]
    assert stats["nfe"] == stats["steps"] == steps == len(runner.calls)
    assert sum(kind == "full" for kind, *_ in runner.calls) == stats["full_forwards"]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_steps_reuse_one_buffer_and_hide_the_queries(no_eot_model_dir, mode):
    runner = SpyRunner(no_eot_model_dir)
    pipe = Pipeline(runner)
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=24, cache=mode, refresh_interval=4)
    result = pipe.generate(PROMPTS[1], image=image(2), config=cfg)
    total = result.stats["prompt_lengths"][0] + cfg.gen_length
    gen_start = total - cfg.gen_length
    cached = [c for c in runner.calls if c[0] == "cached"]
    assert len(cached) == result.stats["cached_forwards"] > 0
    assert len({c[2] for c in cached}) == 1  # the same preallocated buffer every time
    # with one row every refresh writes its presents straight into that buffer
    full = [c for c in runner.calls if c[0] == "full"]
    assert {(c[3], c[4]) for c in full} == {(c[2], c[6]) for c in cached}
    for _, queries, _, shape, past_mask, query_start, _ in cached:
        assert shape[3] == total
        block_end = query_start + cfg.block_length
        assert (query_start - gen_start) % cfg.block_length == 0
        assert queries == (cfg.block_length if mode == "dual" else total - query_start)
        hidden = torch.nonzero(past_mask[0] == 0).flatten().tolist()
        assert hidden == list(range(query_start, block_end if mode == "dual" else total))
    for kind, length, logits_index, *_ in full:
        assert length == total and logits_index.shape == (1, cfg.block_length)  # logits for the block only
