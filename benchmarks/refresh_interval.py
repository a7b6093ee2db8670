"""The refresh-interval dial in one run: the uncached baseline and every (cache, interval) pair on the
same requests, interleaved so that machine drift hits all rows alike.

    python -m benchmarks.refresh_interval --engines DIR [--cache prefix dual] [--intervals 2 4 8 16 32 48]
        [--thresholds 0.7 0.8 0.9 0.95]

With `--backend torch` the baseline is LLaDA's plain loop in PyTorch over the same model (the reference loop of
benchmarks/demo_model/evaluate.py, full forward every step, no cache), so every speedup is the torch backend's
against plain PyTorch; the runtime's own uncached row follows it.

Each threshold adds two rows of Fast-dLLM's parallel decoding (commit every position more confident than
the threshold): uncached, and with the dual cache at the largest interval. On a random model (the benchmark
model) no position is ever that confident, so those rows take one step per token like the others.

Per row: median seconds per request, tokens/s, denoiser calls (full and cached), speedup over the
baseline of the same run, agreement with the baseline's answer (share of identical tokens), the time
spent outside the engines, and exact-match accuracy when the engines were built from the shipped
model (whose labelled evaluation set is the demo task's held-out split). Writes results.json and
refresh_interval.png to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmarks.common import Request, load_pipeline, load_requests, machine_info, shipped_engines
from benchmarks.demo_model.evaluate import reference_loop
from runtime import GenerationResult
from runtime import Request as RuntimeRequest
from runtime.decoding import StageTimer, stop_position, torch_threads


@dataclass(frozen=True)
class Row:
    cache: str
    refresh_interval: int | None
    threshold: float | None = None

    @property
    def label(self) -> str:
        if self.cache == "plain":
            return "plain PyTorch loop"
        decoding = "" if self.threshold is None else f"threshold {self.threshold:g}"
        if self.cache == "none":
            return decoding or "baseline (no cache)"
        return f"{self.cache} r={self.refresh_interval}" + (f" {decoding}" if decoding else "")


@dataclass
class RowRuns:
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    full_forwards: list[int] = field(default_factory=list)
    cached_forwards: list[int] = field(default_factory=list)
    engine_seconds: list[float] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def agreement(answer: list[int], baseline: list[int]) -> float:
    """Share of positions where two answers hold the same token (the longer one sets the length)."""
    length = max(len(answer), len(baseline))
    if length == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, baseline)) / length


def summarize(row: Row, runs: RowRuns, baseline: RowRuns, requests: list[Request]) -> dict:
    seconds = statistics.median(runs.seconds)
    total_seconds = sum(runs.seconds)
    summary = {
        "row": row.label, "cache": row.cache, "refresh_interval": row.refresh_interval, "threshold": row.threshold,
        "median_seconds": seconds,
        "tokens_per_second": sum(runs.tokens) / total_seconds,
        "full_forwards": statistics.mean(runs.full_forwards),
        "cached_forwards": statistics.mean(runs.cached_forwards),
        "speedup": statistics.median(baseline.seconds) / seconds,
        "agreement": statistics.mean(agreement(a, b) for a, b in zip(runs.answers, baseline.answers)),
        "outside_engines_share": 1 - sum(runs.engine_seconds) / total_seconds,
    }
    if all(r.answer is not None for r in requests):
        summary["accuracy"] = statistics.mean(r.is_correct(text) for r, text in zip(requests, runs.texts))
    return summary


def print_table(summaries: list[dict]) -> None:
    header = f"{'row':<28}{'s/request':>10}{'tok/s':>9}{'speedup':>9}{'full':>6}{'cached':>8}{'agree':>7}{'outside':>9}"
    has_accuracy = "accuracy" in summaries[0]
    print(header + ("   accuracy" if has_accuracy else ""))
    for s in summaries:
        line = (f"{s['row']:<28}{s['median_seconds']:>10.3f}{s['tokens_per_second']:>9.1f}{s['speedup']:>8.2f}x"
                f"{s['full_forwards']:>6.1f}{s['cached_forwards']:>8.1f}{s['agreement']:>7.1%}{s['outside_engines_share']:>9.1%}")
        print(line + (f"{s['accuracy']:>11.1%}" if has_accuracy else ""))


def plot(summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = summaries[0]
    quality = "accuracy" if "accuracy" in baseline else "agreement"
    fig, speed_axis = plt.subplots(figsize=(7, 4.2))
    quality_axis = speed_axis.twinx()
    for cache, marker in (("prefix", "o"), ("dual", "s")):
        rows = [s for s in summaries if s["cache"] == cache and s["threshold"] is None]
        if not rows:
            continue
        intervals = [s["refresh_interval"] for s in rows]
        speed_axis.plot(intervals, [s["tokens_per_second"] for s in rows], marker=marker, label=f"{cache}: tokens/s")
        quality_axis.plot(intervals, [100 * s[quality] for s in rows], marker=marker, linestyle="--", alpha=0.6,
                          label=f"{cache}: {quality}")
    speed_axis.axhline(baseline["tokens_per_second"], color="grey", linestyle=":",
                       label=f"{baseline['row']}: tokens/s")
    for s in summaries:
        if s["threshold"] is not None:  # one point each, at the interval it uses (uncached: the first step)
            x = s["refresh_interval"] or 1
            speed_axis.scatter([x], [s["tokens_per_second"]], marker="^", label=f"{s['row']}: tokens/s")
    speed_axis.set_xscale("log", base=2)
    speed_axis.set_xlabel("refresh interval (steps)")
    speed_axis.set_ylabel("tokens / second")
    quality_axis.set_ylabel(f"{quality} (%)")
    quality_axis.set_ylim(0, 105)
    lines = speed_axis.get_legend_handles_labels()[0] + quality_axis.get_legend_handles_labels()[0]
    labels = speed_axis.get_legend_handles_labels()[1] + quality_axis.get_legend_handles_labels()[1]
    speed_axis.legend(lines, labels, fontsize=8, loc="center right")
    speed_axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plain_loop(pipe, request: Request, settings: dict):
    """One request through LLaDA's plain loop on the torch backend's model, timed like a generate call."""
    start = time.perf_counter()
    prompts = pipe.embed_prompts([RuntimeRequest(request.prompt, request.image)], StageTimer(pipe.runner.device))
    with torch_threads(pipe.runner.loop_threads):
        answers, calls = reference_loop(pipe.runner.model, prompts, pipe.special, settings["gen_length"],
                                        settings["block_length"], settings["steps"])
    seconds = time.perf_counter() - start
    answer = answers[0].tolist()
    ids = answer[:stop_position(answer, pipe.special.eot)]
    # Its time outside the model is not measured apart: `outside` reads nan.
    return GenerationResult(pipe.tokenizer.decode(ids, skip_special_tokens=True), ids,
                            {"seconds": seconds, "full_forwards": calls, "cached_forwards": 0,
                             "engine_seconds": float("nan")})


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refresh_interval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="engines folder (or a checkpoint folder with --backend torch)")
    parser.add_argument("--backend", choices=("onnxruntime", "torch", "tensorrt"), default="onnxruntime")
    parser.add_argument("--cache", nargs="+", choices=("prefix", "dual"), default=["prefix", "dual"])
    parser.add_argument("--intervals", nargs="+", type=int, default=[2, 4, 8, 16, 32, 48])
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length)")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[],
                        help="parallel decoding rows: each threshold uncached and with the dual cache")
    parser.add_argument("--requests", type=int, default=4, help="requests timed per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per row first")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if any(i < 1 for i in args.intervals):
        parser.error("--intervals must be >= 1")
    if any(not 0 < t <= 1 for t in args.thresholds):
        parser.error("--thresholds must be in (0, 1]")
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runtime import GenerationConfig

    try:
        pipe = load_pipeline(args.engines, args.backend)
        settings = dict(gen_length=args.gen_length, block_length=args.block_length,
                        steps=args.steps or args.gen_length)
        rows = ([Row("plain", None)] if args.backend == "torch" else []) + [Row("none", None)]
        rows += [Row(c, r) for c in args.cache for r in args.intervals]
        rows += [row for t in args.thresholds for row in (Row("none", None, t), Row("dual", max(args.intervals), t))]
        configs = {row: GenerationConfig(**settings, cache=row.cache, refresh_interval=row.refresh_interval or 1,
                                         threshold=row.threshold) for row in rows if row.cache != "plain"}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labelled = args.backend != "torch" and shipped_engines(args.engines)
    requests = load_requests(args.warmup + args.requests, with_answers=labelled)
    runs = {row: RowRuns() for row in rows}

    with tqdm(total=len(requests) * len(rows), desc="requests", unit="req") as progress:
        for i, request in enumerate(requests):
            order = rows[i % len(rows):] + rows[:i % len(rows)]  # rotate so no row always runs first
            for row in order:
                if row.cache == "plain":
                    result = plain_loop(pipe, request, settings)
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
    summaries = [summarize(row, runs[row], runs[rows[0]], timed) for row in rows]
    print_table(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (args.out / "results.json").write_text(json.dumps({
        "settings": {**vars(args), "engines": str(args.engines), "out": str(args.out), **settings},
        "machine": machine, "summaries": summaries,
        "raw": [{"row": row.label, **asdict(runs[row])} for row in rows]}, indent=2, default=str))
    title = f"{args.engines.name}, {args.backend}, gen {args.gen_length} block {args.block_length} — {machine['cpu']}"
    plot(summaries, args.out / "refresh_interval.png", title)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'refresh_interval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
