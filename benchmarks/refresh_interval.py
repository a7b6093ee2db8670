"""The refresh-interval dial in one run: the uncached baseline and every (cache, refresh policy) pair on the
same requests, interleaved so that machine drift hits all rows alike.

    python -m benchmarks.refresh_interval --engines DIR [--cache prefix dual] [--intervals 2 4 8 16 32 48]
        [--drift-thresholds 0.02 0.06 0.1] [--committed 4 8] [--thresholds 0.7 0.8 0.9 0.95]
        [--plain-model CHECKPOINT]

Refresh policies (runtime/generation/refresh.py): `--intervals` the fixed interval's rows; `--drift-thresholds`
the drift policy's, each refreshing at least once per block (refresh_interval = steps per block); `--committed`
the committed-tokens policy's.

Plain PyTorch rows (with `--backend torch`, or `--plain-model` naming the checkpoint the engines were built from):
LLaDA's plain loop (llada_v/generate.py's reference loop, a full forward every step, no cache) becomes the
baseline, and Fast-dLLM's own cached loops (benchmarks/fast_dllm_loops.py, one refresh per block) are timed beside
the runtime's: `vs Fast-dLLM` is the runtime's speedup over the research loop with the
same cache, in the rows that refresh once per block like it.

Each threshold adds two rows of Fast-dLLM's parallel decoding (commit every position more confident than
the threshold): uncached, and with the dual cache at the largest interval. On a random model (the benchmark
model) no position is ever that confident, so those rows take one step per token like the others.

Per row: median seconds per request, tokens/s, denoiser calls (full, cached, and nfe: both), speedup over the
baseline of the same run, agreement with the baseline's answer (share of identical tokens), the time
spent outside the engines, and exact match and token F1 when the model is the shipped one (whose labelled
evaluation set is the demo task's held-out split). Writes results.json, refresh_interval.png (quality against
tokens/s, a curve per mode) and refresh_policies.png (quality against full forwards per request, a curve per cache
and refresh policy) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.common import (Request, add_device_argument, is_shipped_model, load_pipeline, load_requests,
                               machine_info, source_sha256, token_agreement)
from benchmarks.fast_dllm_loops import cached_loop
from llada_v.generate import reference_loop, steps_per_block_of
from runtime import GenerationResult, GenerationStats
from runtime import Request as RuntimeRequest
from runtime.backends import BACKENDS
from runtime.generation.timing import StageTimer, torch_threads


@dataclass(frozen=True)
class Row:
    cache: str
    refresh_interval: int | None
    threshold: float | None = None
    plain: bool = False  # the research code's loop in PyTorch, not the runtime
    refresh: str = "interval"
    drift_threshold: float | None = None

    @property
    def label(self) -> str:
        if self.plain:
            return "plain PyTorch loop" if self.cache == "none" else f"Fast-dLLM {self.cache} loop"
        decoding = "" if self.threshold is None else f"threshold {self.threshold:g}"
        if self.cache == "none":
            return decoding or "baseline (no cache)"
        if self.refresh == "drift":
            policy = f"drift {self.drift_threshold:g}"
        else:
            policy = f"{'r=' if self.refresh == 'interval' else 'committed '}{self.refresh_interval}"
        return f"{self.cache} {policy}" + (f" {decoding}" if decoding else "")

    def config(self, settings: dict):
        from runtime import GenerationConfig

        drift = {} if self.drift_threshold is None else {"drift_threshold": self.drift_threshold}
        return GenerationConfig(**settings, cache=self.cache, refresh=self.refresh,
                                refresh_interval=self.refresh_interval or 1, threshold=self.threshold, **drift)


@dataclass
class RowRuns:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    full_forwards: list[int] = field(default_factory=list)
    cached_forwards: list[int] = field(default_factory=list)
    engine_seconds: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def summarize(row: Row, runs: RowRuns, baseline: RowRuns, requests: list[Request],
              research: RowRuns | None = None) -> dict:
    """`research`: Fast-dLLM's loop with the same cache, for a runtime row that refreshes once per block."""
    seconds = statistics.median(runs.seconds)
    total_seconds = sum(runs.seconds)
    calls = [f + c for f, c in zip(runs.full_forwards, runs.cached_forwards)]
    summary = {
        "row": row.label, "cache": row.cache, "refresh": row.refresh, "refresh_interval": row.refresh_interval,
        "drift_threshold": row.drift_threshold, "threshold": row.threshold, "plain": row.plain,
        "median_seconds": seconds,
        "tokens_per_second": sum(runs.tokens) / total_seconds,
        "full_forwards": statistics.mean(runs.full_forwards),
        "cached_forwards": statistics.mean(runs.cached_forwards),
        "nfe": statistics.mean(calls),
        "speedup": statistics.median(baseline.seconds) / seconds,
        "agreement": statistics.mean(token_agreement(a, b) for a, b in zip(runs.answers, baseline.answers)),
        "outside_engines_share": 1 - sum(runs.engine_seconds) / total_seconds,
        "vs_fast_dllm": None if research is None else statistics.median(research.seconds) / seconds,
    }
    labelled = all(r.answer is not None for r in requests)
    if labelled:
        correct = [r.is_correct(text) for r, text in zip(requests, runs.texts)]
        summary["accuracy"] = statistics.mean(correct)
        summary["f1"] = statistics.mean(r.f1(text) for r, text in zip(requests, runs.texts))
    summary["by_type"] = {}
    for kind in dict.fromkeys(r.kind for r in requests):
        mine = [i for i, r in enumerate(requests) if r.kind == kind]
        summary["by_type"][kind] = {"nfe": statistics.mean(calls[i] for i in mine)}
        if labelled:
            summary["by_type"][kind]["accuracy"] = statistics.mean(correct[i] for i in mine)
    return summary


def print_table(summaries: list[dict]) -> None:
    has_research = any(s["vs_fast_dllm"] is not None for s in summaries)
    has_accuracy = "accuracy" in summaries[0]
    header = (f"{'row':<28}{'s/request':>10}{'tok/s':>9}{'speedup':>9}" + (f"{'vs Fast-dLLM':>13}" if has_research else "")
              + f"{'full':>6}{'cached':>8}{'nfe':>6}{'agree':>7}{'outside':>9}" + ("  exact     F1" if has_accuracy else ""))
    print(header)
    for s in summaries:
        line = f"{s['row']:<28}{s['median_seconds']:>10.3f}{s['tokens_per_second']:>9.1f}{s['speedup']:>8.2f}x"
        if has_research:
            line += f"{s['vs_fast_dllm']:>12.2f}x" if s["vs_fast_dllm"] is not None else " " * 13
        line += (f"{s['full_forwards']:>6.1f}{s['cached_forwards']:>8.1f}{s['nfe']:>6.1f}{s['agreement']:>7.1%}"
                 f"{s['outside_engines_share']:>9.1%}")
        print(line + (f"{s['accuracy']:>7.1%}{s['f1']:>7.1%}" if has_accuracy else ""))


def mode(summary: dict) -> str:
    """The curve a row belongs to on the plot: the loop, its cache, and whether it decodes by threshold."""
    if summary["plain"]:
        return "plain PyTorch" if summary["cache"] == "none" else f"Fast-dLLM {summary['cache']}"
    cache = "no cache" if summary["cache"] == "none" else summary["cache"]
    policy = "" if summary["cache"] == "none" or summary["refresh"] == "interval" else f" {summary['refresh']}"
    return cache + policy + (" + threshold" if summary["threshold"] is not None else "")


def point_label(summary: dict) -> float | None:
    """What tells a curve's points apart: the threshold, the drift threshold or the refresh interval."""
    if summary["threshold"] is not None:
        return summary["threshold"]
    return summary["drift_threshold"] if summary["refresh"] == "drift" else summary["refresh_interval"]


def plot(summaries: list[dict], path: Path, title: str, x: str = "tokens_per_second") -> None:
    """Quality (exact match, or agreement with the baseline on a model without labels) against `x`: one curve per
    mode, its points the intervals, drift thresholds or thresholds. Against tokens/s (every row, the research
    loops included) it is the figure of the Fast-dLLM paper; against full_forwards (the runtime's rows) it is the
    refresh policies' trade-off whatever a full forward costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = "accuracy" if "accuracy" in summaries[0] else "agreement"
    curves: dict[str, list[dict]] = {}
    for s in summaries:
        if x == "tokens_per_second" or not s["plain"]:
            curves.setdefault(mode(s), []).append(s)
    fig, axis = plt.subplots(figsize=(7, 4.2))
    for name, rows in curves.items():
        rows = sorted(rows, key=lambda s: s[x])
        axis.plot([s[x] for s in rows], [100 * s[quality] for s in rows], marker="o",
                  linestyle="-" if len(rows) > 1 else "none", label=name)
        for s in rows:
            note = point_label(s)
            if note is not None and len(rows) > 1:
                axis.annotate(f"{note:g}", (s[x], 100 * s[quality]), fontsize=6,
                              textcoords="offset points", xytext=(3, 3))
    axis.set_xscale("log")
    x_name = "tokens / second" if x == "tokens_per_second" else "full forwards per request"
    axis.set_xlabel(f"{x_name} (labels: refresh interval, drift threshold or threshold)")
    axis.set_ylabel(f"{'exact match' if quality == 'accuracy' else 'agreement with the baseline'} (%)")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plain_loop(pipe, request: Request, settings: dict, cache: str):
    """One request through the research code's loop (`cache` none: LLaDA's; prefix/dual: Fast-dLLM's) on a torch
    pipeline's model, timed like a generate call."""
    start = time.perf_counter()
    prompts = pipe.embed_prompts([RuntimeRequest(request.prompt, request.image)], StageTimer(pipe.runner.device))
    decode = (settings["gen_length"], settings["block_length"], settings["steps"])
    # The research loops make their tensors with torch's factory functions: on the model's device inside this block.
    with torch_threads(pipe.runner.loop_threads), torch.device(pipe.runner.device):
        if cache == "none":
            answers, full, cached = *reference_loop(pipe.runner.model, prompts, pipe.special, *decode), 0
        else:
            answers, full, cached = cached_loop(pipe.runner.model, prompts[0], pipe.special, *decode, cache)
    seconds = time.perf_counter() - start
    ids, finish_reason = pipe.rules.final_answer(answers[0].tolist())
    # Its time outside the model is not measured apart: `outside` reads nan.
    stats = GenerationStats(nfe=full + cached, full_forwards=full, cached_forwards=cached, steps=full + cached,
                            seconds=seconds, tokens_per_second=len(ids) / seconds, batch_size=1,
                            prompt_lengths=[len(prompts[0])], engine_seconds=float("nan"), finish_reason=finish_reason)
    return GenerationResult(pipe.text(ids), ids, stats)


def research_row(row: Row, steps_per_block: int) -> Row | None:
    """Fast-dLLM's loop with a runtime row's cache, when the row refreshes once per block as that loop does."""
    if row.plain or row.cache == "none" or row.threshold is not None or row.refresh != "interval" \
            or row.refresh_interval < steps_per_block:
        return None
    return Row(row.cache, steps_per_block, plain=True)


def plain_pipeline(args, pipe):
    """The torch pipeline the plain loops run on: the benchmarked one with --backend torch, else --plain-model's,
    which must hold the weights the engines were built from (or the speedups compare two models)."""
    if args.plain_model is None:
        return pipe if args.backend == "torch" else None
    if source_sha256(args.plain_model) != source_sha256(args.engines):
        raise ValueError(f"--plain-model {args.plain_model} is not the checkpoint {args.engines} was built from "
                         f"(their sha256 differ): give the engines' source checkpoint")
    return load_pipeline(args.plain_model, "torch", args.device)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refresh_interval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="engines folder (or a checkpoint folder with --backend torch)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--cache", nargs="+", choices=("prefix", "dual"), default=["prefix", "dual"])
    parser.add_argument("--intervals", nargs="+", type=int, default=[2, 4, 8, 16, 32, 48])
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    parser.add_argument("--drift-thresholds", nargs="*", type=float, default=[],
                        help="rows of the drift refresh policy, each at least one refresh per block")
    parser.add_argument("--committed", nargs="*", type=int, default=[],
                        help="rows of the committed-tokens refresh policy: tokens between refreshes")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[],
                        help="parallel decoding rows: each threshold uncached and with the dual cache")
    parser.add_argument("--requests", type=int, default=4, help="requests timed per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per row first")
    parser.add_argument("--plain-model", type=Path, default=None,
                        help="checkpoint the engines were built from: adds the plain PyTorch loops (LLaDA's, "
                             "Fast-dLLM's cached ones) as rows, the plain loop as the baseline (default with "
                             "--backend torch: the --engines checkpoint itself)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if any(i < 1 for i in args.intervals + args.committed):
        parser.error("--intervals and --committed must be >= 1")
    if any(not 0 < t < float("inf") for t in args.drift_thresholds):
        parser.error("--drift-thresholds must be > 0")
    if any(not 0 < t <= 1 for t in args.thresholds):
        parser.error("--thresholds must be in (0, 1]")
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = dict(gen_length=args.gen_length, block_length=args.block_length,
                        steps=args.steps or args.gen_length)
        steps_per_block = steps_per_block_of(**settings)
        pipe = load_pipeline(args.engines, args.backend, args.device)
        plain_pipe = plain_pipeline(args, pipe)
        rows = [Row("none", None)] + [Row(c, r) for c in args.cache for r in args.intervals]
        rows += [Row(c, steps_per_block, refresh="drift", drift_threshold=t)
                 for c in args.cache for t in args.drift_thresholds]
        rows += [Row(c, n, refresh="committed") for c in args.cache for n in args.committed]
        rows += [row for t in args.thresholds for row in (Row("none", None, t), Row("dual", max(args.intervals), t))]
        configs = {row: row.config(settings) for row in rows}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plain_pipe is not None:
        rows = [Row("none", None, plain=True)] + [Row(c, steps_per_block, plain=True) for c in args.cache] + rows
    labelled = is_shipped_model(args.engines)
    requests = load_requests(args.warmup + args.requests, with_answers=labelled,
                             with_images=pipe.runner.config.has_vision)
    runs = {row: RowRuns() for row in rows}

    with tqdm(total=len(requests) * len(rows), desc="requests", unit="req") as progress:
        for i, request in enumerate(requests):
            order = rows[i % len(rows):] + rows[:i % len(rows)]  # rotate so no row always runs first
            for row in order:
                if row.plain:
                    result = plain_loop(plain_pipe, request, settings, row.cache)
                else:
                    result = pipe.generate(request.prompt, image=request.image, config=configs[row])
                progress.update()
                if i < args.warmup:
                    continue
                stats = result.stats
                run = runs[row]
                run.seconds.append(stats["seconds"])
                run.tokens.append(len(result.token_ids))
                run.full_forwards.append(stats["full_forwards"])
                run.cached_forwards.append(stats["cached_forwards"])
                run.engine_seconds.append(stats["engine_seconds"])
                run.answers.append(list(result.token_ids))
                run.texts.append(result.text)

    timed = requests[args.warmup:]
    summaries = [summarize(row, runs[row], runs[rows[0]], timed, runs.get(research_row(row, steps_per_block)))
                 for row in rows]
    print_table(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (args.out / "results.json").write_text(json.dumps({
        "settings": {**vars(args), "engines": str(args.engines), "out": str(args.out), **settings},
        "machine": machine, "summaries": summaries,
        "raw": [{"row": row.label, **asdict(runs[row])} for row in rows]}, indent=2, default=str))
    title = f"{args.engines.name}, {args.backend}, gen {args.gen_length} block {args.block_length} — {machine['cpu']}"
    plot(summaries, args.out / "refresh_interval.png", title)
    plot(summaries, args.out / "refresh_policies.png", title, x="full_forwards")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'refresh_interval.png'} and "
          f"{args.out / 'refresh_policies.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
