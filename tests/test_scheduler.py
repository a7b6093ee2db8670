"""Iteration-level batching (runtime/serving/scheduler.py, Decoder.admit/retire) and the image-embedding cache: every
answer equals its request run alone, with rows joining and leaving between steps."""

import threading
import time

import numpy as np
import pytest
from PIL import Image

import llada_v
from runtime import GenerationConfig, Pipeline, Request
from runtime.generation.batch import Batch
from runtime.generation.decoder import Decoder
from runtime.generation.timing import StageTimer
from runtime.generation.image_cache import ImageEmbeddingCache
from runtime.serving.metrics import ServerMetrics
from runtime.serving.scheduler import QueueFullError, RequestTimeoutError, Scheduler, SchedulerStoppedError


@pytest.fixture(scope="module")
def long_pipe(no_eot_model_dir):
    """Answers that never end early, so rows really overlap."""
    with Pipeline.load(no_eot_model_dir, backend="torch") as pipe:
        yield pipe


def image(seed: int, size=(90, 140)) -> np.ndarray:
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


REQUESTS = [("What colour is the circle?", image(0)), ("Hi", None), ("How many shapes?", image(1, (200, 64))),
            ("Compare <image> with <image>.", [image(2), image(3)]), ("Tell me more, please, at length.", None),
            ("What shape is red?", image(4, (64, 64)))]


def staggered(pipe, requests, configs, max_batch):
    """Submit each request once the previous one has committed its first tokens (so requests join a running
    batch), and return the jobs and the largest number of rows that ran together."""
    scheduler = Scheduler(pipe, max_batch=max_batch).start()
    jobs, widest = [], 0
    try:
        for (prompt, img), cfg in zip(requests, configs):
            started = threading.Event()
            jobs.append(scheduler.submit(Request(prompt, img), cfg,
                                         lambda e, s=started: e.kind != "started" and s.set()))
            started.wait(30)
            widest = max(widest, scheduler.running_rows)
        for job in jobs:
            assert job.wait(60)
    finally:
        scheduler.stop()
    return jobs, widest


@pytest.mark.parametrize("settings", [dict(cache="none"), dict(cache="prefix", refresh_interval=3),
                                      dict(cache="dual", refresh_interval=2), dict(cache="dual", threshold=0.5),
                                      dict(temperature=0.7, remasking="random")])
def test_rows_joining_and_leaving_answer_as_alone(long_pipe, settings):
    configs = [GenerationConfig(gen_length=32, block_length=8, steps=32, seed=seed, **settings)
               for seed in range(len(REQUESTS))]
    alone = [long_pipe.generate(Request(p, i), config=c).token_ids for (p, i), c in zip(REQUESTS, configs)]
    jobs, widest = staggered(long_pipe, REQUESTS, configs, max_batch=3)
    assert [job.error for job in jobs] == [None] * len(jobs)
    assert [job.result.token_ids for job in jobs] == alone
    assert 2 <= widest <= 3  # rows ran together, never more than max_batch
    starts = sorted(job.started for job in jobs)
    assert any(job.started > starts[0] and job.started < jobs[0].started + jobs[0].result.stats["seconds"]
               for job in jobs[1:])  # some request joined while the first was running
    for job in jobs:
        assert job.result.stats["nfe"] == job.result.stats["full_forwards"] + job.result.stats["cached_forwards"]


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_full_passes_per_row_equal_the_batched_full_pass(long_pipe, cache, monkeypatch):
    """The CPU's per-row full passes (runner.full_pass_per_row) against the plain batched one."""
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache, refresh_interval=3)
    requests = [Request(p, i) for p, i in REQUESTS]
    prompts = long_pipe.embed_prompts(requests, StageTimer(long_pipe.runner.device))
    answers, calls = [], []
    for per_row in (False, True):
        monkeypatch.setattr(type(long_pipe.runner), "full_pass_per_row", property(lambda runner: per_row))
        batch = Batch.left_padded(prompts, cfg.gen_length, long_pipe.special.mask, long_pipe.runner)
        decoder = Decoder(long_pipe.runner, batch, cfg, long_pipe.rules,
                          StageTimer(long_pipe.runner.device))
        for _ in decoder:
            pass
        answers.append(decoder.answers)
        calls.append(decoder.counts["full_forwards"])
    assert answers[0] == answers[1]
    assert calls[1] == calls[0] * len(requests)  # one call per row instead of one per step


LONGEST = "Tell me everything about this picture: every shape, its colour and its place, at length, please."


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_new_row_takes_a_free_place_or_the_batch_is_padded_anew(long_pipe, cache):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache, refresh_interval=3)
    timer = StageTimer(long_pipe.runner.device)
    long_a, long_b, short, longest = long_pipe.embed_prompts(
        [Request("What is it?", image(0)), Request("And this?", image(1)), Request("Hi"),
         Request(LONGEST, image(2, (64, 200)))], timer)
    assert len(short) < len(long_a) < len(longest)
    batch = Batch.left_padded([long_a, long_b], cfg.gen_length, long_pipe.special.mask, long_pipe.runner)
    decoder = Decoder(long_pipe.runner, batch, cfg, long_pipe.rules, timer)
    decoder.tags = ["a", "b"]
    for _ in range(3):
        decoder.step()
    decoder.retire([0])
    decoder.admit([short], [0], ["short"])  # fits in front of the answers: takes row 0's place
    assert decoder.tags == ["short", "b"] and decoder.batch.size == 2
    decoder.step()
    decoder.admit([longest], [0], ["longest"])  # longer than the prompt span: padded anew
    assert decoder.tags == ["short", "b", "longest"] and decoder.batch.gen_start == len(longest)
    while decoder.step():
        pass
    answers = dict(zip(decoder.tags, decoder.answers))
    for tag, prompt in (("short", "Hi"), ("b", ("And this?", image(1))),
                        ("longest", (LONGEST, image(2, (64, 200))))):
        request = Request(prompt) if isinstance(prompt, str) else Request(*prompt)
        assert answers[tag] == long_pipe.generate(request, config=cfg).token_ids, tag


def test_settings_that_cannot_share_a_call_run_as_groups(long_pipe):
    configs = [GenerationConfig(gen_length=16, block_length=8, steps=16, cache=cache)
               for cache in ("none", "dual", "none", "dual")]
    requests = REQUESTS[:4]
    alone = [long_pipe.generate(Request(p, i), config=c).token_ids for (p, i), c in zip(requests, configs)]
    scheduler = Scheduler(long_pipe, max_batch=4)
    jobs = [scheduler.submit(Request(p, i), c) for (p, i), c in zip(requests, configs)]
    scheduler.start()
    try:
        for job in jobs:
            assert job.wait(60)
    finally:
        scheduler.stop()
    assert [job.result.token_ids for job in jobs] == alone
    assert {job.result.stats["cached_forwards"] > 0 for job in jobs} == {True, False}


def test_cancelled_row_is_freed_within_a_step(long_pipe):
    metrics = ServerMetrics()
    scheduler = Scheduler(long_pipe, max_batch=1, metrics=metrics).start()
    progressed = threading.Event()
    try:
        long_job = scheduler.submit(Request("Hi"), GenerationConfig(gen_length=256, block_length=8, steps=256),
                                    lambda e: e.kind == "tokens" and progressed.set())
        waiting = scheduler.submit(Request("Hello"), GenerationConfig(gen_length=8, block_length=8, steps=8))
        assert progressed.wait(30)
        assert scheduler.queue_depth == 1  # the one row is taken
        long_job.cancel()
        assert waiting.wait(30) and waiting.result is not None
        assert long_job.finished and long_job.result is None and long_job.error is None
    finally:
        scheduler.stop()
    assert metrics.requests.labels("cancelled")._value.get() == 1
    assert metrics.requests.labels("completed")._value.get() == 1


def test_full_queue_and_stopped_scheduler_refuse(long_pipe):
    scheduler = Scheduler(long_pipe, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    scheduler.submit(Request("a"), cfg)
    scheduler.submit(Request("b"), cfg)
    with pytest.raises(QueueFullError, match="max_queue 2"):
        scheduler.submit(Request("c"), cfg)
    scheduler.start()
    scheduler.stop()  # finishes what waits
    with pytest.raises(SchedulerStoppedError):
        scheduler.submit(Request("d"), cfg)
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(long_pipe, max_batch=0)


def test_bad_request_fails_alone(long_pipe):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    scheduler = Scheduler(long_pipe, max_batch=4)
    good = scheduler.submit(Request("What is it?", image(5)), cfg)
    bad_image = scheduler.submit(Request("What is it?", b"not an image"), cfg)
    too_long = scheduler.submit(Request("Hi"), GenerationConfig(gen_length=4096, block_length=4096, steps=4096))
    scheduler.start()
    try:
        for job in (good, bad_image, too_long):
            assert job.wait(60)
    finally:
        scheduler.stop()
    assert good.result.token_ids == long_pipe.generate("What is it?", image(5), config=cfg).token_ids
    assert isinstance(bad_image.error, ValueError) and "not a readable image" in str(bad_image.error)
    assert "exceeds the maximum sequence length" in str(too_long.error)


def test_stop_finishes_running_requests(long_pipe):
    scheduler = Scheduler(long_pipe, max_batch=2).start()
    cfg = GenerationConfig(gen_length=32, block_length=8, steps=32)
    jobs = [scheduler.submit(Request(p), cfg) for p in ("one", "two", "three")]
    scheduler.stop()
    assert [len(job.result.token_ids) for job in jobs] == [32, 32, 32]


def test_max_tokens_cuts_the_answer_and_events_only_grow_it(long_pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    scheduler = Scheduler(long_pipe).start()
    events = []
    job = scheduler.submit(Request("Hi"), cfg, events.append, max_tokens=11)
    job.wait(60)
    scheduler.stop()
    full = long_pipe.generate("Hi", config=cfg)
    assert job.result.token_ids == full.token_ids[:11]
    assert job.result.stats["finish_reason"] == "length"
    assert [e.kind for e in events][0] == "started" and events[-1].kind == "done"
    prefixes = [e.token_ids for e in events if e.kind == "tokens"]
    assert prefixes and all(len(a) < len(b) for a, b in zip(prefixes, prefixes[1:]))
    assert all(p == job.result.token_ids[:len(p)] for p in prefixes)  # never a token taken back


# ---- the image-embedding cache --------------------------------------------------------------------------------

def test_image_cache_is_exact_and_skips_the_vision_tower(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(image(7)).save(path)
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8, cache="dual")
    with Pipeline.load(llada_v.SHIPPED_MODEL_DIR, backend="torch") as plain, \
            Pipeline.load(llada_v.SHIPPED_MODEL_DIR, backend="torch", image_cache_mb=1) as cached:
        expected = [plain.generate(q, image=im, config=cfg) for q, im in
                    [("What colour is it?", path), ("What shape?", path.read_bytes()), ("Both <image> <image>", [path, image(8)])]]
        first = cached.generate("What colour is it?", image=path, config=cfg)
        assert cached.image_cache.misses == 1 and first.stats["stage_seconds"]["vision"] > 0
        again = cached.generate("What shape?", image=path.read_bytes(), config=cfg)  # same pixels, other form
        assert cached.image_cache.hits == 1 and again.stats["stage_seconds"]["vision"] == 0
        pair = cached.generate("Both <image> <image>", image=[path, image(8)], config=cfg)  # padded views: new keys
        assert cached.image_cache.misses == 3
        assert [r.token_ids for r in (first, again, pair)] == [r.token_ids for r in expected]


def test_image_cache_budget_and_keys():
    cache = ImageEmbeddingCache(max_bytes=1000)
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    assert cache.key(red, "anyres") != cache.key(blue, "anyres") != cache.key(blue, "pad")
    palette_a = Image.new("P", (4, 4), 0)
    palette_b = palette_a.copy()
    palette_b.putpalette([255, 0, 0] * 256)
    assert cache.key(palette_a, "anyres") != cache.key(palette_b, "anyres")
    import torch

    cache.put(b"a", torch.zeros(100))  # 400 bytes
    cache.put(b"b", torch.zeros(100))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"c", torch.zeros(100))  # over 1000 bytes: b, the least recent, goes
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    cache.put(b"huge", torch.zeros(1000))  # larger than the budget: not kept, nothing evicted
    assert cache.get(b"huge") is None and len(cache) == 2 and cache.bytes_used == 800
    with pytest.raises(ValueError, match="budget"):
        ImageEmbeddingCache(-1)


def test_an_engine_fault_fails_the_requests_in_flight_and_the_worker_goes_on(long_pipe, monkeypatch):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    runner = long_pipe.runner
    real = runner.denoise_logits  # the uncached loop's full pass
    faults = iter([RuntimeError("device lost")])

    def failing_once(*args, **kwargs):
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "denoise_logits", failing_once)
    metrics = ServerMetrics()
    scheduler = Scheduler(long_pipe, metrics=metrics).start()
    try:
        first = scheduler.submit(Request("Hi"), cfg)
        assert first.wait(30) and isinstance(first.error, RuntimeError)
        second = scheduler.submit(Request("Hi"), cfg)
        assert second.wait(30) and second.result is not None
    finally:
        scheduler.stop()
    assert metrics.requests.labels("failed")._value.get() == 1


def test_max_batch_is_clamped_to_what_the_engines_take(engines_dir, caplog):
    import dataclasses

    pipe = Pipeline.load(engines_dir)
    pipe.runner.limits = dataclasses.replace(pipe.runner.limits, max_batch=2)
    with caplog.at_level("WARNING", logger="runtime.serving.scheduler"):
        scheduler = Scheduler(pipe, max_batch=8)
    assert scheduler.max_batch == 2
    assert "max_batch 8 is more rows than these engines take in one call (2" in caplog.text
    assert Scheduler(pipe, max_batch=1).max_batch == 1


# ---- preparation off the worker, timeouts, draining, the canvas --------------------------------------------------

def test_a_request_is_prepared_on_the_thread_that_submits_it(long_pipe, monkeypatch):
    """A slow preparation (a huge prompt to tokenize, images to decode) holds its own thread, not the batch."""
    real_prepare, release = long_pipe.prepare, threading.Event()

    def slow_prepare(request):
        if request.prompt == "slow":
            assert threading.current_thread().name != "llada-v-scheduler"
            release.wait(30)
        return real_prepare(request)

    monkeypatch.setattr(long_pipe, "prepare", slow_prepare)
    scheduler = Scheduler(long_pipe, max_batch=2).start()
    steps = []
    try:
        running = scheduler.submit(Request("Hi"), GenerationConfig(gen_length=64, block_length=8, steps=64),
                                   lambda e: e.kind == "canvas" and steps.append(e.step), canvas=True)
        submitter = threading.Thread(target=scheduler.submit, args=(Request("slow"), GenerationConfig(gen_length=8,
                                                                                                  block_length=8)))
        submitter.start()
        assert running.wait(60) and running.result is not None  # all 64 steps ran while "slow" was being prepared
        assert steps == list(range(1, 65)) and submitter.is_alive()
        release.set()
        submitter.join(30)
    finally:
        release.set()
        scheduler.stop()


def test_a_request_past_its_timeout_is_retired_and_the_others_go_on(long_pipe):
    metrics = ServerMetrics()
    scheduler = Scheduler(long_pipe, max_batch=2, metrics=metrics).start()
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    try:
        slow = scheduler.submit(Request("Go on"), GenerationConfig(gen_length=1024, block_length=8, steps=1024),
                                timeout=0.5)
        quick = scheduler.submit(Request("Hi"), cfg)
        assert slow.wait(60) and quick.wait(60)
    finally:
        scheduler.stop()
    assert isinstance(slow.error, RequestTimeoutError) and "timeout of 0.5 s" in str(slow.error)
    assert quick.result.token_ids == long_pipe.generate("Hi", config=cfg).token_ids
    assert metrics.requests.labels("timed_out")._value.get() == 1
    with pytest.raises(ValueError, match="timeout must be None or a number of seconds > 0"):
        scheduler.submit(Request("Hi"), cfg, timeout=0)


def test_stop_fails_what_is_left_at_its_deadline(long_pipe):
    scheduler = Scheduler(long_pipe, max_batch=1).start()
    started = threading.Event()
    running = scheduler.submit(Request("Go on"), GenerationConfig(gen_length=1024, block_length=8, steps=1024),
                               lambda e: e.kind == "started" and started.set())
    waiting = scheduler.submit(Request("Hi"), GenerationConfig(gen_length=8, block_length=8))
    assert started.wait(30)
    begun = time.perf_counter()
    scheduler.stop(0.5, wait=False)  # returns at once; the worker ends by itself
    scheduler.stop(60)  # a later call never extends the deadline
    assert time.perf_counter() - begun < 10
    for job in (running, waiting):
        assert isinstance(job.error, SchedulerStoppedError)


def test_the_canvas_shows_every_step_and_never_takes_a_token_back(long_pipe):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, cache="dual")
    scheduler = Scheduler(long_pipe).start()
    canvases = []
    job = scheduler.submit(Request("Hi"), cfg, lambda e: e.kind == "canvas" and canvases.append(e), max_tokens=12,
                           canvas=True)
    assert job.wait(60)
    scheduler.stop()
    mask = long_pipe.special.mask
    assert [c.step for c in canvases] == list(range(1, 9)) and all(len(c.token_ids) == 12 for c in canvases)
    masked = [c.token_ids.count(mask) for c in canvases]
    assert masked[0] > 0 and masked[-1] == 0 and masked == sorted(masked, reverse=True)
    for earlier, later in zip(canvases, canvases[1:]):
        assert all(a == b for a, b in zip(earlier.token_ids, later.token_ids) if a != mask)
    assert canvases[-1].token_ids == job.result.token_ids
