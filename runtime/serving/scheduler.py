"""Scheduler: iteration-level batching over one Pipeline, for a server with many clients.

One worker thread owns the runner. Between denoising steps it retires the rows that finished or whose
client went away and admits waiting requests, up to `max_batch` rows in all, so a request that arrives
while others run starts at the next step, not after the batch ends. Requests join a group of the same
settings (the GenerationConfig less the seed: the batch shares block length, steps, cache and the rest,
each row keeps its own seed), and each group is one Decoder whose step is one denoiser call per kind;
groups take their steps in turn. A new row takes a finished row's place or the batch is left-padded anew
(Decoder.admit), so every answer is the one the same request gives alone. A request is prepared (tokenized, its
images decoded) on the thread that submits it, so the worker runs only the engines; a request past its timeout is
retired from the batch like one whose client went away.

    scheduler = Scheduler(pipeline, max_batch=8).start()
    job = scheduler.submit(Request("Hi"), GenerationConfig(gen_length=32), on_event=print)
    job.wait(); print(job.result.text)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerationConfig
from ..generation.decoder import Decoder
from ..generation.prompt import PreparedRequest, Request
from ..generation.results import GenerationResult, GenerationStats
from ..generation.timing import StageTimer
from ..pipeline import Pipeline

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Every place in the queue is taken: retry later."""


class SchedulerStoppedError(RuntimeError):
    """The scheduler is stopping or stopped: it takes no new requests."""


class RequestTimeoutError(RuntimeError):
    """The request ran past its timeout: it was retired from the batch (nothing else was disturbed)."""


@dataclass
class Event:
    """What a job reports, on the worker thread (or on the submitting thread for a request that cannot be
    prepared): kind "started" (it has a row: its request was good), "tokens" (the answer's final prefix grew:
    `token_ids`), "canvas" (a job submitted with canvas=True, after each of its steps: the whole answer,
    masks included, in `token_ids`, and the steps its row has taken, `step`), "done" (`result`) or "error"
    (`error`: a ValueError for a bad request, RequestTimeoutError, SchedulerStoppedError, anything else for
    a fault)."""

    kind: str
    token_ids: list[int] | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    step: int | None = None


@dataclass(eq=False)  # a job is itself: compared and hashed by identity
class Job:
    request: Request
    config: GenerationConfig
    on_event: Callable[[Event], None]
    max_tokens: int | None = None  # the answer is cut after this many tokens (None: gen_length)
    timeout: float | None = None  # seconds from submission, after which it is stopped with RequestTimeoutError
    canvas: bool = False  # report a "canvas" event after every step
    prepared: PreparedRequest | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)
    _shown: int = 0  # tokens of the final prefix already reported

    def cancel(self) -> None:
        """Free the job's row (or its place in the queue) at the next step; it then reports nothing more."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout

    def _leave_cancelled(self) -> None:
        """The cancelled job has left its row or the queue: wait() returns, and it reports nothing."""
        self._done.set()

    def _time_out(self) -> None:
        self._report(Event("error", error=RequestTimeoutError(
            f"the request ran past its timeout of {self.timeout:g} s and was stopped: ask for fewer tokens or "
            f"steps, or retry when fewer requests are running")))

    def _report(self, event: Event) -> None:
        if event.kind == "done":
            self.result = event.result
        elif event.kind == "error":
            self.error = event.error
        if event.kind in ("done", "error"):
            self._done.set()
        try:
            self.on_event(event)
        except Exception:  # a listener's fault must not stop the worker that serves everyone else
            log.exception("a job's event listener failed")


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch: int = 8, max_queue: int = 64, metrics=None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        limits = pipeline.runner.limits
        if limits is not None and max_batch > limits.max_batch:
            log.warning("max_batch %d is more rows than these engines take in one call (%d, the build's --max-batch): "
                        "decoding %d rows at a time; rebuild the engines with --max-batch %d to batch more",
                        max_batch, limits.max_batch, limits.max_batch, max_batch)
            max_batch = limits.max_batch
        self.pipeline, self.max_batch, self.max_queue, self.metrics = pipeline, max_batch, max_queue, metrics
        self.groups: dict[GenerationConfig, Decoder] = {}  # per setting, its rows (Decoder.tags: their jobs)
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._drain_until = math.inf  # once stopping: when what is left fails
        self._thread: threading.Thread | None = None

    # ---- clients' side (any thread) -----------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._work, name="llada-v-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, config: GenerationConfig,
               on_event: Callable[[Event], None] = lambda event: None, max_tokens: int | None = None, *,
               timeout: float | None = None, canvas: bool = False) -> Job:
        """Prepare one request on this thread and queue it. QueueFullError when max_queue requests already wait,
        SchedulerStoppedError once stopping; a request that cannot be prepared (or whose text alone does not fit
        with the answer) fails at once with an "error" event. timeout: seconds from now after which the request
        is stopped with RequestTimeoutError; canvas: report "canvas" events."""
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf):
            raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
        self.check_room()  # before the preparation, which may cost
        job = Job(request, config, on_event, max_tokens, timeout, canvas)
        try:
            job.prepared = self.pipeline.prepare(request)
            self.pipeline.check_fits([len(job.prepared.ids)], config)
        except ValueError as err:
            job._report(Event("error", error=err))
            self._count("invalid")
            return job
        with self._wake:
            self._check_room()
            self._waiting.append(job)
            self._observe_queue()
            self._wake.notify()
        return job

    def check_room(self) -> None:
        """QueueFullError when max_queue requests wait, SchedulerStoppedError once stopping: what submit would
        refuse, for a caller to ask before it does work of its own on a request."""
        with self._wake:
            self._check_room()

    def _check_room(self) -> None:
        if self._stopping:
            raise SchedulerStoppedError("the server is shutting down: it takes no new requests")
        if len(self._waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue "
                                 f"{self.max_queue}): retry later")

    def stop(self, timeout: float | None = None, wait: bool = True) -> None:
        """Take no new requests; the running and waiting ones go on for up to `timeout` seconds (None: until they
        finish), then what is left fails with SchedulerStoppedError and the worker ends (a later call can only
        shorten that time). wait: return once the worker has ended."""
        with self._wake:
            self._stopping = True
            self._drain_until = min(self._drain_until, math.inf if timeout is None else time.perf_counter() + timeout)
            self._wake.notify()
        if self._thread is None:  # never started: nothing will run what waits
            self._fail_all_left()
            return
        if wait:
            self._thread.join()

    @property
    def running_rows(self) -> int:
        return sum(len(jobs(decoder)) for decoder in self.groups.values())

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # ---- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self.groups and not self._stopping:
                    self._wake.wait()
                if self._stopping and (not self._waiting and not self.groups
                                       or time.perf_counter() >= self._drain_until):
                    break
                self._expire_waiting()
                admitted = self._take_admissible()
            try:
                self._admit(admitted)
                for key in list(self.groups):
                    self._step(key)
            except Exception as err:  # a fault of the engines: the requests in flight fail, the worker goes on
                log.exception("a denoising step failed")
                running = [job for decoder in self.groups.values() for _, job in jobs(decoder)]
                self._fail(running + [job for job in admitted if job not in running and not job.finished], err)
                self.groups.clear()
            self._observe_batch()
        self._fail_all_left()

    def _fail_all_left(self) -> None:
        with self._wake:
            left = [job for decoder in self.groups.values() for _, job in jobs(decoder)] + list(self._waiting)
            self.groups.clear()
            self._waiting.clear()
        self._fail(left, SchedulerStoppedError("the server stopped before this request finished"))

    def _fail(self, failed: list[Job], err: BaseException) -> None:
        for job in failed:
            job._report(Event("error", error=err))
            self._count("failed")

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        expired = [job for job in self._waiting if not job.cancelled and job.expired(now)]
        for job in expired:
            self._waiting.remove(job)
            job._time_out()
            self._count("timed_out")

    def _take_admissible(self) -> list[Job]:
        admitted = []
        while self._waiting and self.running_rows + len(admitted) < self.max_batch:
            job = self._waiting.popleft()
            if not job.cancelled:
                admitted.append(job)
            else:
                job._leave_cancelled()
                self._count("cancelled")
        self._observe_queue()
        return admitted

    def _admit(self, admitted: list[Job]) -> None:
        """Prompt embeddings of the new jobs (the images of all of them through one vision call), then each
        joins its group; a job with a bad request fails alone."""
        if not admitted:
            return
        prompts = self._embed(admitted)
        now = time.perf_counter()
        joining: dict[GenerationConfig, list[tuple[Job, torch.Tensor]]] = {}
        for job, prompt in zip(admitted, prompts):
            if isinstance(prompt, ValueError):
                job._report(Event("error", error=prompt))
                self._count("invalid")
                continue
            job.started = now
            job._report(Event("started"))
            joining.setdefault(dataclasses.replace(job.config, seed=0), []).append((job, prompt))
        pipeline = self.pipeline
        for key, members in joining.items():
            new_jobs, new_prompts = [j for j, _ in members], [p for _, p in members]
            seeds = [j.config.seed for j in new_jobs]
            if key in self.groups:
                self.groups[key].admit(new_prompts, seeds, new_jobs)
            else:
                self.groups[key] = pipeline.decoder(new_prompts, key, StageTimer(pipeline.runner.device), seeds,
                                                    new_jobs)
            if self.metrics is not None:
                self.metrics.admitted([now - j.submitted for j in new_jobs])

    def _embed(self, admitted: list[Job]) -> list[torch.Tensor | ValueError]:
        """Each job's prompt embeddings, or the ValueError that says what is wrong with its request."""
        pipeline, timer = self.pipeline, StageTimer(self.pipeline.runner.device)
        cache = pipeline.image_cache
        lookups = (cache.hits, cache.misses) if cache is not None else None
        try:
            prompts = pipeline.embed_prompts([job.prepared for job in admitted], timer)
        except ValueError:  # one of them is bad: find which, each on its own
            prompts = []
            for job in admitted:
                try:
                    prompts += pipeline.embed_prompts([job.prepared], timer)
                except ValueError as err:
                    prompts.append(err)
        checked = []
        for job, prompt in zip(admitted, prompts):
            if not isinstance(prompt, ValueError):
                try:
                    pipeline.check_fits([len(prompt)], job.config)
                except ValueError as err:
                    prompt = err
            checked.append(prompt)
        if self.metrics is not None and cache is not None:
            self.metrics.image_lookups(cache.hits - lookups[0], cache.misses - lookups[1])
        return checked

    def _step(self, key: GenerationConfig) -> None:
        decoder, now = self.groups[key], time.perf_counter()
        leaving = {}
        for r, job in jobs(decoder):
            if job.cancelled:
                job._leave_cancelled()
                leaving[r] = "cancelled"
            elif job.expired(now):
                job._time_out()
                leaving[r] = "timed_out"
        self._retire(key, leaving)
        if key not in self.groups:
            return
        mask, metrics = self.pipeline.special.mask, self.metrics
        if metrics is not None:  # what the step committed, and its calls
            before, masked = dict(decoder.counts), sum(a.count(mask) for a in decoder.answers)
            start = time.perf_counter()
        decoder.step()
        if metrics is not None:
            calls = {kind: decoder.counts[kind] - before[kind] for kind in ("full_forwards", "cached_forwards")}
            committed = masked - sum(a.count(mask) for a in decoder.answers)
            metrics.stepped(time.perf_counter() - start, calls, committed)
        finished = {}
        for r, job in jobs(decoder):
            if job.canvas:
                state = decoder.rows[r]
                job._report(Event("canvas", token_ids=decoder.answers[r][:job.max_tokens],
                                  step=state.full_forwards + state.cached_forwards))  # one call per step per row
            if decoder.rows[r].done:
                job._report(Event("done", result=self._result(job, decoder, r)))
                finished[r] = "completed"
            else:
                self._report_prefix(job, decoder.answers[r])
        self._retire(key, finished)

    def _retire(self, key: GenerationConfig, outcomes: dict[int, str]) -> None:
        """Free the rows (row -> outcome) of a group in one go (retiring may renumber the rest)."""
        if not outcomes:
            return
        decoder = self.groups[key]
        decoder.retire(list(outcomes))
        if not jobs(decoder):
            del self.groups[key]
        for outcome in outcomes.values():
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.finished(outcome)

    def _report_prefix(self, job: Job, answer: list[int]) -> None:
        """The answer is final up to its first still-masked position (or <|eot_id|>): report it as it grows."""
        prefix = self.pipeline.rules.final_prefix(answer)[:job.max_tokens]
        if len(prefix) > job._shown:
            job._shown = len(prefix)
            job._report(Event("tokens", token_ids=prefix))

    def _result(self, job: Job, decoder: Decoder, row: int) -> GenerationResult:
        """The row's own figures: its denoiser calls (one per step), the time since it started."""
        ids, finish_reason = self.pipeline.rules.final_answer(decoder.answers[row])
        if job.max_tokens is not None and len(ids) > job.max_tokens:
            ids, finish_reason = ids[:job.max_tokens], "length"
        state, seconds = decoder.rows[row], time.perf_counter() - job.started
        nfe = state.full_forwards + state.cached_forwards
        stats = GenerationStats(nfe=nfe, full_forwards=state.full_forwards, cached_forwards=state.cached_forwards,
                                steps=nfe, seconds=seconds, tokens_per_second=len(ids) / seconds if seconds > 0 else 0.0,
                                batch_size=1, prompt_lengths=[decoder.batch.prompt_lengths[row]],
                                queue_seconds=job.started - job.submitted, finish_reason=finish_reason)
        if self.metrics is not None:
            self.metrics.tokens(len(ids))
        return GenerationResult(self.pipeline.text(ids), ids, stats)

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))

    def _observe_batch(self) -> None:
        if self.metrics is not None:
            self.metrics.batch_rows.set(self.running_rows)


def jobs(decoder: Decoder) -> list[tuple[int, Job]]:
    """The decoder's rows that hold a job, with their row index."""
    return [(r, job) for r, job in enumerate(decoder.tags) if job is not None]
