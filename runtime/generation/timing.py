"""Where a generation's time goes (StageTimer) and how many threads torch's own ops take meanwhile."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

STAGES = ("preprocess", "vision", "projector", "full_forward", "cached_forward", "remasking")
ENGINE_STAGES = ("vision", "projector", "full_forward", "cached_forward")


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
