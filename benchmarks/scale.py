"""`python -m benchmarks.scale --params 1e9 3e9 [--precision fp16 int4 ...]`: memory and time of a real-size build
and serve, as multiples of the weights, projected to LLaDA-8B.

For each size it writes a random LLaDA language model with LLaDA-8B's proportions (`scaled_config`: head
dimension 128, as many layers as heads, MLP 3x the width, the vocabulary scaled with the width from
LLaDA-8B's 126,464 at 4096, so `--params 8e9` is LLaDA-8B's shape; bf16 safetensors shards in the released
layout, written tensor by tensor), then per precision, each phase in its own process so that its peak
RSS is its own:
- build: `exporter.build_engines` (what `python -m exporter build --precision P --model CKPT` runs); peak RSS
  over the engines' weight bytes, and what the build adds over its fixed cost: the peak of the same build of a
  FIXED_COST_PARAMS model (11 MB of weights), i.e. the interpreter, torch, ONNX Runtime, transformers (the
  tokenizer) and the modules torch and the exporter import on first use, ~0.6 GB whatever the model's size
  (~0.3 GB of it before the build starts). Seconds per GB of engines weights, and per step its seconds, the
  RSS it started with, the largest RSS sampled while it ran and the process's peak so far (which catches what
  50 ms sampling misses).
- serve: `Pipeline.load(engines, "onnxruntime")` and one text generation (dual cache); RSS after loading
  and at the end over the engines' weight bytes; the KV cache's bytes are reported separately.
Projection to 8B: the phase's fixed cost (build) or starting RSS (serve) plus LLaDA-8B's 8.0e9 parameters in the
same precision times the measured ratio of what the phase added.
The vision tower (5% of LLaDA-V) is left out: a text-only checkpoint exercises the same denoiser path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

LLADA_8B_PARAMS = 8.02e9
LLADA_8B = dict(hidden=4096, vocab=126464)
HEAD_DIM = 128
SHARD_BYTES = 1 << 30
GEN = dict(gen_length=16, block_length=16, steps=16, cache="dual", refresh_interval=16)
PROMPT = "Describe the picture."
FIXED_COST_PARAMS = 6e6  # the smallest scaled_config (hidden 256): its build's peak is the build's fixed cost


def scaled_config(params: float):
    """A text-only LladaVConfig of about `params` parameters with LLaDA-8B's proportions."""
    from llada_v.config import LanguageConfig, LladaVConfig

    def language(hidden: int) -> LanguageConfig:
        heads = hidden // HEAD_DIM
        vocab = round(LLADA_8B["vocab"] * hidden / LLADA_8B["hidden"])
        return LanguageConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                              num_hidden_layers=heads, num_attention_heads=heads, num_key_value_heads=heads,
                              max_position_embeddings=4096)

    widths = range(2 * HEAD_DIM, 64 * HEAD_DIM + 1, HEAD_DIM)
    hidden = min(widths, key=lambda h: abs(parameter_count(language(h)) - params))
    return LladaVConfig(language=language(hidden), vision=None)


def parameter_count(lm) -> int:
    h, layer = lm.hidden_size, 4 * lm.hidden_size**2 + 3 * lm.hidden_size * lm.intermediate_size + 2 * lm.hidden_size
    return lm.num_hidden_layers * layer + 2 * lm.vocab_size * h + h


def write_random_checkpoint(cfg, folder: Path, seed: int = 0) -> int:
    """Seeded random bf16 weights in shards of SHARD_BYTES, one tensor made at a time; a tokenizer of exactly
    vocab_size tokens (the shipped one plus filler tokens). Returns the weight bytes."""
    from tokenizers import AddedToken, Tokenizer

    from llada_v import SHIPPED_MODEL_DIR, LladaV
    from llada_v.weights import copy_tokenizer, save_tensors, to_checkpoint_key

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {to_checkpoint_key(n, cfg): p.shape for n, p in LladaV(cfg).named_parameters()}
    generator = torch.Generator().manual_seed(seed)

    def random_tensors():
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                yield key, torch.ones(shape, dtype=torch.bfloat16)
            else:
                std = 0.02 if "embed_tokens" in key else shape[-1] ** -0.5
                yield key, (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)

    total = save_tensors(random_tensors(), folder, SHARD_BYTES)
    cfg.save(folder / "config.json")
    copy_tokenizer(SHIPPED_MODEL_DIR, folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fillers = cfg.language.vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(f"<|filler_{i}|>", special=True) for i in range(fillers)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return total


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    return _status_bytes("VmHWM")


def rss() -> int:
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    """A memory figure of /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status: the scale benchmark measures memory on Linux")


def engines_weight_bytes(folder: Path) -> int:
    """The bytes of every part's graph and weights, and the embedding table."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".onnx_data", ".safetensors"))


def phase_build(checkpoint: Path, engines: Path, precision: str) -> dict:
    """One build, in this process. Its progress lines are parsed for each step's seconds, and a sampling thread
    attributes the resident memory it sees every 50 ms to the step then running (the one whose line is open)."""
    import contextlib
    import io
    import threading

    from exporter.build import build_engines

    log, step_starts, step_peaks, step_peak_so_far, done = io.StringIO(), {}, {}, {}, threading.Event()

    def sample():
        while not done.wait(0.05):
            lines = log.getvalue().splitlines()
            if lines and lines[-1].endswith(" ..."):
                step, now = lines[-1][:-4], rss()
                step_starts.setdefault(step, now)  # what the step found: memory the steps before it left
                step_peaks[step] = max(step_peaks.get(step, 0), now)
                step_peak_so_far[step] = peak_rss()

    before = rss()  # the interpreter with torch and ONNX Runtime imported: what any build starts from
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(log):
            build_engines(checkpoint, engines, precision, force=True)
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    steps = {m[1]: float(m[2]) for m in re.finditer(r"^(.+?) \.\.\. ([0-9.]+) s", log.getvalue(), re.MULTILINE)}
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak_rss(), "steps": steps,
            "step_start_rss": step_starts, "step_peak_rss": step_peaks, "step_peak_so_far": step_peak_so_far}


def phase_serve(engines: Path, device: str) -> dict:
    """Load the engines with ONNX Runtime on `device` and generate once, in this process. On CUDA the device's
    used memory (torch.cuda.mem_get_info: ONNX Runtime's allocations included) after loading and after the
    generation is recorded too."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from llada_v import conversation_ids
    from runtime import GenerationConfig, Pipeline

    before = rss()
    start = time.perf_counter()
    pipe = Pipeline.load(engines, backend="onnxruntime", device=device)
    loaded, load_seconds = rss(), time.perf_counter() - start
    gpu = {}
    if pipe.runner.device.type == "cuda":
        gpu["gpu_used_loaded"] = gpu_used_bytes(pipe.runner.device)
    start = time.perf_counter()
    result = pipe.generate(PROMPT, config=GenerationConfig(**GEN))
    generate_seconds = time.perf_counter() - start
    if gpu:
        gpu["gpu_used_after_generate"] = gpu_used_bytes(pipe.runner.device)
    lm = pipe.runner.config.language
    length = len(conversation_ids(pipe.tokenizer, [{"role": "user", "content": PROMPT}])) + GEN["gen_length"]
    kv_bytes = 2 * lm.num_hidden_layers * length * lm.hidden_size * pipe.runner.dtype.itemsize  # keys and values
    pipe.close()
    return {"load_seconds": load_seconds, "generate_seconds": generate_seconds, "rss_before": before,
            "rss_loaded": loaded, "peak_rss": peak_rss(), "kv_cache_bytes": kv_bytes, "answer_tokens": len(result.token_ids),
            **gpu}


def gpu_used_bytes(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def run_phase(*args: str) -> dict:
    """One phase in a child process (its own peak RSS); its result is the last line it prints."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--phase", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"phase {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fixed_costs(precisions: list[str], out: Path) -> dict[str, int]:
    """Per precision, the peak RSS of a build of a FIXED_COST_PARAMS model: what any build of it costs."""
    small = out / "checkpoint-fixed-cost"
    if not (small / "config.json").is_file():
        write_random_checkpoint(scaled_config(FIXED_COST_PARAMS), small)
    return {p: run_phase("build", str(small), str(out / f"engines-fixed-cost-{p}"), p)["peak_rss"] for p in precisions}


def measure(params: float, precisions: list[str], out: Path, fixed: dict[str, int], device: str) -> list[dict]:
    cfg = scaled_config(params)
    checkpoint = out / f"checkpoint-{params:.0e}"
    if not (checkpoint / "config.json").is_file():
        print(f"writing a random {parameter_count(cfg.language) / 1e9:.2f}B checkpoint to {checkpoint} ...",
              file=sys.stderr, flush=True)
        write_random_checkpoint(cfg, checkpoint)
    rows = []
    for precision in precisions:
        engines = out / f"engines-{params:.0e}-{precision}"
        print(f"{params:.0e} {precision}: build ...", file=sys.stderr, flush=True)
        build = run_phase("build", str(checkpoint), str(engines), precision)
        weights = engines_weight_bytes(engines)
        print(f"{params:.0e} {precision}: serve ...", file=sys.stderr, flush=True)
        serve = run_phase("serve", str(engines), device)
        rows.append(summarize(cfg, params, precision, weights, build, fixed[precision], serve))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def summarize(cfg, params: float, precision: str, weights: int, build: dict, fixed_peak_rss: int,
              serve: dict) -> dict:
    gb = 1e9
    n = parameter_count(cfg.language)
    build_ratio = build["peak_rss"] / weights
    build_added = (build["peak_rss"] - fixed_peak_rss) / weights
    serve_ratio = (serve["rss_loaded"] - serve["rss_before"]) / weights
    weights_8b = weights * LLADA_8B_PARAMS / n
    lm = cfg.language
    return {"params": n, "hidden": lm.hidden_size, "layers": lm.num_hidden_layers, "vocab": lm.vocab_size,
            "precision": precision, "engines_weight_gb": weights / gb,
            "build_seconds": build["seconds"], "build_seconds_per_gb": build["seconds"] / (weights / gb),
            "build_peak_rss_gb": build["peak_rss"] / gb, "build_peak_over_weights": build_ratio,
            "build_start_rss_gb": build["rss_before"] / gb, "build_fixed_rss_gb": fixed_peak_rss / gb,
            "build_added_over_weights": build_added,
            "build_steps": build["steps"],
            "build_step_start_rss_gb": {step: rss / gb for step, rss in build["step_start_rss"].items()},
            "build_step_peak_rss_gb": {step: rss / gb for step, rss in build["step_peak_rss"].items()},
            "build_peak_rss_so_far_gb": {step: rss / gb for step, rss in build["step_peak_so_far"].items()},
            "serve_load_seconds": serve["load_seconds"], "serve_loaded_over_weights": serve_ratio,
            "serve_peak_rss_gb": serve["peak_rss"] / gb, "serve_peak_over_weights": serve["peak_rss"] / weights,
            "kv_cache_mb": serve["kv_cache_bytes"] / 1e6, "generate_seconds": serve["generate_seconds"],
            "projected_8b": {"weights_gb": weights_8b / gb,
                             "build_peak_gb": (fixed_peak_rss + weights_8b * build_added) / gb,
                             "serve_gb": (serve["rss_before"] + weights_8b * serve_ratio) / gb,
                             "build_hours": build["seconds"] / (weights / gb) * weights_8b / gb / 3600}}


def table(rows: list[dict]) -> str:
    lines = ["| params | precision | engines GB | build peak (x weights) | build above fixed cost (x weights) | "
             "build s/GB | loaded (x weights) | serve peak (x weights) | KV cache MB | 8B: build peak / serve GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["projected_8b"]
        lines.append(f"| {r['params'] / 1e9:.2f}B | {r['precision']} | {r['engines_weight_gb']:.2f} | "
                     f"{r['build_peak_rss_gb']:.2f} GB ({r['build_peak_over_weights']:.2f}x) | "
                     f"{r['build_added_over_weights']:.2f}x | "
                     f"{r['build_seconds_per_gb']:.0f} | {r['serve_loaded_over_weights']:.2f}x | "
                     f"{r['serve_peak_rss_gb']:.2f} GB ({r['serve_peak_over_weights']:.2f}x) | {r['kv_cache_mb']:.0f} | "
                     f"{p['build_peak_gb']:.0f} / {p['serve_gb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e9], help="model sizes, e.g. 1e9 3e9")
    parser.add_argument("--precision", nargs="+", default=["fp16"], choices=("fp32", "fp16", "int8", "int4"))
    parser.add_argument("--out", type=Path, default=Path("scale-bench"),
                        help="working folder: checkpoints, engines, results.json (needs ~4x the fp16 weights)")
    parser.add_argument("--device", default="cpu", help="where the serve phase runs: cpu, cuda or cuda:N")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)  # internal: one phase in this process
    args = parser.parse_args(argv)
    if args.phase:
        name, *rest = args.phase
        result = phase_build(Path(rest[0]), Path(rest[1]), rest[2]) if name == "build" else \
            phase_serve(Path(rest[0]), rest[1])
        print(json.dumps(result))
        return 0
    from benchmarks.common import machine_info

    args.out.mkdir(parents=True, exist_ok=True)
    fixed = fixed_costs(args.precision, args.out)
    rows = [row for params in args.params for row in measure(params, args.precision, args.out, fixed, args.device)]
    (args.out / "results.json").write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
