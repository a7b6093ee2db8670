"""Backends side by side on the same requests, per stage, so each stage's share of a request shows.

    python -m benchmarks.engines --model CHECKPOINT --engines DIR [--cache dual --refresh-interval 8]

PyTorch eager runs the checkpoint; ONNX Runtime (and TensorRT, where present) run the engines. Stages
are the ones the runtime times: image preprocessing, vision, projector, full forwards, cached forwards, remasking, and the
rest of the loop. Writes engines.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import add_device_argument, load_pipeline, load_requests, machine_info, run_interleaved
from runtime.backends import BACKENDS
from runtime.config import CACHE_MODES

STAGES = ("preprocess", "vision", "projector", "full_forward", "cached_forward", "remasking", "other")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder (PyTorch eager)")
    parser.add_argument("--engines", type=Path, required=True, help="engines folder built from that checkpoint")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                        choices=BACKENDS)
    parser.add_argument("--cache", choices=CACHE_MODES, default="dual")
    parser.add_argument("--refresh-interval", type=int, default=8)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    add_device_argument(parser)
    args = parser.parse_args(argv)

    from runtime import GenerationConfig

    try:
        config = GenerationConfig(gen_length=args.gen_length, block_length=args.block_length,
                                  steps=args.steps or args.gen_length, cache=args.cache,
                                  refresh_interval=args.refresh_interval)
        pipes = {b: load_pipeline(args.model if b == "torch" else args.engines, b, args.device) for b in args.backends}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_interleaved(pipes, load_requests(args.warmup + args.requests, with_answers=False), config,
                              args.warmup)
    timings = {b: [{"seconds": r.stats["seconds"], **r.stats["stage_seconds"]} for r in rs] for b, rs in results.items()}

    print(f"{'stage (median s)':<18}" + "".join(f"{b:>24}" for b in pipes))
    for stage in ("seconds", *STAGES):
        cells = []
        for backend in pipes:
            value = statistics.median(t[stage] for t in timings[backend])
            total = statistics.median(t["seconds"] for t in timings[backend])
            cells.append(f"{value:>14.4f} ({value / total:>5.1%})")
        print(f"{'request' if stage == 'seconds' else stage:<18}" + "".join(f"{c:>24}" for c in cells))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "timings": timings}, indent=2))
    print(f"wrote {args.out / 'engines.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
