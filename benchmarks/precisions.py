"""Engine precisions side by side on one checkpoint: speed, agreement with fp32, memory, in one run.

    python -m benchmarks.precisions --model CHECKPOINT [--precisions fp32 fp16 int8 int4] [--requests 3]

Builds the checkpoint's engines at every precision (ONNX Runtime, CPU), runs the same requests through all of
them interleaved (request by request, precision by precision), and reports per precision the median seconds per
request, tokens/s, the share of answer tokens equal to the fp32 engines' (position by position), the engines'
weight bytes, and (each in its own process, benchmarks/scale.py's serve phase) the resident memory after loading
and at the end of one generation. Held-out accuracy per precision is `python -m benchmarks.demo_model.evaluate
--engines DIR --backend onnxruntime` on engines built from the shipped model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import (add_device_argument, load_pipeline, load_requests, machine_info, run_interleaved,
                               token_agreement)
from benchmarks.scale import engines_weight_bytes, run_phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precisions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "int4"],
                        choices=("fp32", "fp16", "int8", "int4"), help="the first is the baseline of the agreement")
    parser.add_argument("--cache", choices=("none", "prefix", "dual"), default="dual")
    parser.add_argument("--refresh-interval", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    add_device_argument(parser)
    args = parser.parse_args(argv)

    import warnings

    from exporter.build import BuildError, build_engines
    from runtime import GenerationConfig

    try:
        config = GenerationConfig(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                                  refresh_interval=args.refresh_interval)
        folders = {p: build_engines(args.model, args.out / f"engines-{p}", p, force=True, progress=False)
                   for p in args.precisions}
    except (ValueError, BuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    memory = {p: run_phase("serve", str(folder), args.device or "cpu") for p, folder in folders.items()}
    with warnings.catch_warnings():
        # fp16 on the CPU provider is measured here on purpose; its load-time warning is in the README
        warnings.filterwarnings("ignore", message="fp16 engines on ONNX Runtime's CPU provider")
        pipes = {p: load_pipeline(folder, "onnxruntime", args.device) for p, folder in folders.items()}
    results = run_interleaved(pipes, load_requests(args.warmup + args.requests, with_answers=False), config,
                              args.warmup)
    seconds = {p: [r.stats["seconds"] for r in rs] for p, rs in results.items()}
    tokens = {p: [r.token_ids for r in rs] for p, rs in results.items()}
    baseline = args.precisions[0]
    rows = []
    for precision in pipes:
        median = statistics.median(seconds[precision])
        rows.append({
            "precision": precision, "seconds_per_request": median, "tokens_per_second": args.gen_length / median,
            "speedup_vs_baseline": statistics.median(seconds[baseline]) / median,
            "token_agreement": statistics.mean(token_agreement(t, b) for t, b in zip(tokens[precision], tokens[baseline])),
            "engines_weight_mb": engines_weight_bytes(folders[precision]) / 1e6,
            "loaded_rss_mb": (memory[precision]["rss_loaded"] - memory[precision]["rss_before"]) / 1e6,
            "peak_rss_mb": memory[precision]["peak_rss"] / 1e6})
    print(f"| precision | s/request | tok/s | vs {baseline} | tokens equal to {baseline} | engines MB | loaded MB | "
          f"peak MB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['seconds_per_request']:.2f} | {r['tokens_per_second']:.1f} | "
              f"{r['speedup_vs_baseline']:.2f}x | {r['token_agreement']:.1%} | {r['engines_weight_mb']:.0f} | "
              f"{r['loaded_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precisions.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "rows": rows,
        "seconds": seconds, "tokens": tokens}, indent=2))
    print(f"wrote {args.out / 'precisions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
