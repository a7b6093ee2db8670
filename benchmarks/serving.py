"""Serving benchmark: real HTTP clients against real `python -m runtime serve` processes, iteration-level
batching (--max-batch B) against one request at a time (--max-batch 1), the same load on both in one run.

    python -m benchmarks.serving --engines bench-model/engines --concurrency 1 4 16 --requests 32

Per concurrency level and server: requests/s, answer tokens/s, p50/p95 latency and time to the first
streamed text, and whether every answer equals the other server's. Both servers start once and stay idle
while the other is measured (ONNX Runtime does not spin), and the levels alternate between them. Writes
serving.json and serving.png under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import add_device_argument, load_requests, machine_info
from benchmarks.server_process import ServerProcess, user_message
from runtime.backends import BACKENDS
from runtime.config import CACHE_MODES


def one_request(url: str, body: dict) -> dict:
    """One streamed chat completion: its text, latency, time to first text and answer tokens."""
    start = time.perf_counter()
    first, text, usage = None, "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"the server answered {reply.status_code}: {reply.read().decode()}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", ()):
                if choice["delta"].get("content"):
                    first = first if first is not None else time.perf_counter() - start
                    text += choice["delta"]["content"]
    return {"text": text, "latency": time.perf_counter() - start, "ttft": first,
            "tokens": usage["completion_tokens"]}


def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """All bodies through `concurrency` clients that each send their next request when the last one ends."""
    results: list[dict | None] = [None] * len(bodies)
    pending = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            results[index] = one_request(url, bodies[index])

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    seconds = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"seconds": seconds, "requests_per_second": len(bodies) / seconds,
            "tokens_per_second": sum(r["tokens"] for r in results) / seconds,
            "latency_p50": float(np.percentile(latencies, 50)), "latency_p95": float(np.percentile(latencies, 95)),
            "ttft_p50": float(np.percentile(ttfts, 50)) if ttfts else None,
            "ttft_p95": float(np.percentile(ttfts, 95)) if ttfts else None,
            "answers": [r["text"] for r in results]}


def request_bodies(count: int, args) -> list[dict]:
    """The demo task's held-out questions with their images, one seed each."""
    bodies = []
    for i, request in enumerate(load_requests(count, with_answers=False)):
        bodies.append({"messages": [user_message(request.prompt, [request.image])], "stream": True,
                       "stream_options": {"include_usage": True}, "max_tokens": args.gen_length,
                       "block_length": args.block_length, "cache": args.cache,
                       "refresh_interval": args.refresh_interval, "seed": i, **({"threshold": args.threshold}
                                                                                 if args.threshold else {})})
    return bodies


def plot(levels: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for server in ("batched", "single"):
        x = [level["concurrency"] for level in levels]
        left.plot(x, [level[server]["tokens_per_second"] for level in levels], marker="o", label=server)
        right.plot(x, [level[server]["latency_p50"] for level in levels], marker="o", label=f"{server} p50")
        right.plot(x, [level[server]["latency_p95"] for level in levels], marker="x", linestyle="--",
                   label=f"{server} p95")
    left.set(xlabel="concurrent clients", ylabel="answer tokens / s", xscale="log", title="throughput")
    right.set(xlabel="concurrent clients", ylabel="seconds", xscale="log", title="latency")
    for axis in (left, right):
        axis.set_xticks(x, [str(c) for c in x])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_table(levels: list[dict], max_batch: int) -> None:
    print("| clients | server | req/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 first text (s) | "
          "speedup | same answers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for level in levels:
        for server, name in (("batched", f"--max-batch {max_batch}"), ("single", "--max-batch 1")):
            row = level[server]
            speedup = row["tokens_per_second"] / level["single"]["tokens_per_second"]
            ttft = "-" if row["ttft_p50"] is None else f"{row['ttft_p50']:.2f}"  # no answer had any text
            print(f"| {level['concurrency']} | {name} | {row['requests_per_second']:.2f} | "
                  f"{row['tokens_per_second']:.1f} | {row['latency_p50']:.2f} | {row['latency_p95']:.2f} | "
                  f"{ttft} | {speedup:.2f}x | {level['identical_answers']}/{level['requests']} |")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, required=True, help="engines folder (a checkpoint with --backend torch)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level and server")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's rows")
    parser.add_argument("--gen-length", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--cache", choices=CACHE_MODES, default="dual")
    parser.add_argument("--refresh-interval", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = request_bodies(args.requests, args)
    common = ("--engines", str(args.engines), "--backend", args.backend, "--max-queue", str(args.requests),
              *(("--device", args.device) if args.device else ()))
    servers = {"batched": ServerProcess(*common, "--max-batch", str(args.max_batch), threads=2),
               "single": ServerProcess(*common, "--max-batch", "1", threads=2)}
    levels = []
    try:
        for server in servers.values():  # warm-up: first calls allocate
            run_load(server.url, bodies[:2], 2)
        for concurrency in args.concurrency:
            level = {"concurrency": concurrency, "requests": len(bodies)}
            for name, server in servers.items():
                level[name] = run_load(server.url, bodies, concurrency)
                print(f"concurrency {concurrency:>3} {name:>7}: {level[name]['tokens_per_second']:.1f} tokens/s, "
                      f"p50 {level[name]['latency_p50']:.2f} s", file=sys.stderr)
            level["identical_answers"] = sum(a == b for a, b in zip(level["batched"]["answers"],
                                                                    level["single"]["answers"]))
            level["speedup"] = level["batched"]["tokens_per_second"] / level["single"]["tokens_per_second"]
            levels.append(level)
    finally:
        for server in servers.values():
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(), "levels": levels}
    (args.out / "serving.json").write_text(json.dumps(report, indent=2))
    plot(levels, args.out / "serving.png", f"{args.engines.name}: {args.cache} cache, r={args.refresh_interval}, "
                                           f"{args.gen_length} tokens, --max-batch {args.max_batch} vs 1")
    print_table(levels, args.max_batch)
    print(f"wrote {args.out / 'serving.json'} and {args.out / 'serving.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
