"""One command that proves a GPU: every GPU path present, checked against the CPU, with a table and JSON.

    PYTHONPATH=. python -m benchmarks.gpu_check [--out gpu-check] [--self-check]

Runs from a source checkout on a machine with torch (CUDA build), Triton, onnx, onnxruntime, transformers,
tokenizers, safetensors, Pillow and numpy, and no network (it imports none of the server's packages). For each
path that is present, and with the reason for each that is not:
- answers: the shipped model's answers to held-out questions on each GPU path (the torch backend in bf16, fp16
  with the Triton attention kernel, fp32, and bf16 with both Triton kernels switched off; ONNX Runtime's CUDA
  provider on fp32 and fp16 engines; TensorRT fp32 and fp16 engines), uncached and with the dual cache, each
  against the CPU's float32 answers with the same settings: token agreement and answers equal.
- kernels: the Triton kernels against their references at LLaDA-8B's shapes (head dim 128, 32 queries against
  1k-8k cached positions in fp16; bf16 runs PyTorch's SDPA, which is timed beside; remasking over the 126,464-entry
  vocabulary for fp32 and fp16 logits): max error, and milliseconds beside the reference's.
- speed: one full pass (1,152 positions) and one dual-cache step (32 queries against 1,152 slots) of a random model
  of LLaDA-8B's layer width in bf16, at two layer counts: the time per layer (their difference), its extrapolation
  to 32 layers and the head, and the weight-read floor (a layer's weight bytes over the bandwidth a device copy
  measures).
Sized to finish in a few minutes on one H100. Without a GPU it says so and exits 0; `--self-check` runs every
section on the CPU at tiny sizes instead (the kernels through TRITON_INTERPRET=1), so that CI keeps the harness
working.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    questions: int  # held-out questions, spread over the question types
    attention_keys: tuple[int, ...]
    heads: int
    vocab: int
    hidden: int  # the speed section's model: LLaDA-8B's width on a GPU
    intermediate: int
    layers: tuple[int, int]  # two layer counts: the time per layer is their difference
    sequence: int  # the full pass's positions (and the dual step's cache slots)
    repeats: int


GPU_SIZES = Sizes(questions=24, attention_keys=(1024, 2048, 4096, 8192), heads=32, vocab=126464, hidden=4096,
                  intermediate=12288, layers=(1, 3), sequence=1152, repeats=10)
CPU_SIZES = Sizes(questions=6, attention_keys=(64,), heads=2, vocab=1000, hidden=128, intermediate=256, layers=(1, 2),
                  sequence=64, repeats=2)
HEAD_DIM = 128
QUERIES = 32
LLADA_8B_LAYERS = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json and engines")
    parser.add_argument("--self-check", action="store_true",
                        help="without a GPU: run every section on the CPU at tiny sizes (for CI)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.self_check:
        print("no CUDA GPU is visible to torch (torch.cuda.is_available() is False): no GPU path to check here; "
              "--self-check runs the harness on the CPU")
        return 0
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run in numpy
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"machine": machine(device), "answers": answer_rows(device, sizes, args.out),
              "kernels": kernel_rows(device, sizes), "speed": speed_rows(device, sizes)}
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0


def machine(device: torch.device) -> dict:
    import onnxruntime

    facts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
             "torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": onnxruntime.__version__,
             "onnxruntime_providers": onnxruntime.get_available_providers(), "python": platform.python_version()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    try:
        import tensorrt

        facts["tensorrt"] = tensorrt.__version__
    except ImportError:
        facts["tensorrt"] = None
    return facts


# ---- answers ----------------------------------------------------------------------------------------------------

def answer_rows(device: torch.device, sizes: Sizes, out: Path) -> list[dict]:
    """Each GPU path's answers against the CPU's float32 answers, uncached and with the dual cache."""
    from benchmarks.common import token_agreement
    from benchmarks.demo_model.data import QUESTION_TYPES, load_examples, prompt_text
    from benchmarks.demo_model.evaluate import decoding_for
    from llada_v import SHIPPED_MODEL_DIR
    from runtime import GenerationConfig, Pipeline

    examples = load_examples("eval")
    per_type = max(1, sizes.questions // len(QUESTION_TYPES))
    chosen = [ex for kind in QUESTION_TYPES for ex in [e for e in examples if e.kind == kind][:per_type]]
    configs = {"uncached": {}, "dual r=4": {"cache": "dual", "refresh_interval": 4}}

    def answers(pipe) -> dict[str, list[list[int]]]:
        return {name: [pipe.generate(prompt_text(ex.question), image=ex.image,
                                     config=GenerationConfig(**decoding_for(ex.kind), **extra)).token_ids
                       for ex in chosen] for name, extra in configs.items()}

    with Pipeline.load(SHIPPED_MODEL_DIR, "torch", device="cpu", dtype=torch.float32) as cpu:
        reference = answers(cpu)
    rows = []
    for path, load in gpu_paths(device, out):
        if isinstance(load, str):
            rows.append({"path": path, "skipped": load})
            continue
        start = time.perf_counter()
        try:
            with load() as pipe:
                got = answers(pipe)
        except Exception as err:  # a path that fails is a finding to report, not a reason to stop the others
            rows.append({"path": path, "failed": f"{type(err).__name__}: {err}"})
            continue
        finally:
            os.environ.pop("TRITON_KERNELS_DISABLE", None)
        for name in configs:
            pairs = list(zip(got[name], reference[name]))
            rows.append({"path": path, "decoding": name, "questions": len(pairs),
                         "token_agreement": statistics.mean(token_agreement(a, b) for a, b in pairs),
                         "answers_equal": sum(a == b for a, b in pairs),
                         "seconds": time.perf_counter() - start})
    return rows


def gpu_paths(device: torch.device, out: Path):
    """(name, a function that loads its Pipeline, or the reason it cannot run here)."""
    from llada_v import SHIPPED_MODEL_DIR
    from runtime import Pipeline

    def torch_path(dtype, fused=True, kernels=True):
        def load():
            if not kernels:
                os.environ["TRITON_KERNELS_DISABLE"] = "1"
            return Pipeline.load(SHIPPED_MODEL_DIR, "torch", device=str(device), dtype=dtype, fused_cache=fused)
        return load

    where = device.type
    yield f"torch {where} bf16 (SDPA)", torch_path(torch.bfloat16)
    yield f"torch {where} fp16 (Triton attention)", torch_path(torch.float16)
    yield f"torch {where} fp32", torch_path(torch.float32)
    yield f"torch {where} bf16, no Triton kernels", torch_path(torch.bfloat16, fused=False, kernels=False)

    import onnxruntime

    ort_device, ort_reason = ("cuda", None) if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else \
        ("cpu", "onnxruntime has no CUDAExecutionProvider here (a CPU build; install onnxruntime-gpu)")
    if device.type == "cuda" and ort_reason:
        yield "onnxruntime cuda", ort_reason
    else:
        for precision in ("fp32", "fp16"):
            yield f"onnxruntime {ort_device} {precision}", lambda p=precision: Pipeline.load(
                engines(out, p, "onnx"), "onnxruntime", device=ort_device)

    from exporter.trt_build import unavailable_reason

    if reason := unavailable_reason():
        yield "tensorrt", reason
    else:
        for precision in ("fp32", "fp16"):
            yield f"tensorrt {precision}", lambda p=precision: Pipeline.load(engines(out, p, "tensorrt"), "tensorrt")


def engines(out: Path, precision: str, backend: str) -> Path:
    from exporter.build import build_engines

    folder = out / f"engines-{backend}-{precision}"
    return build_engines(None, folder, precision, backend, force=True, progress=False)


# ---- kernels ----------------------------------------------------------------------------------------------------

def kernel_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    import torch.nn.functional as F

    import triton_kernels
    from triton_kernels import reference

    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for keys in sizes.attention_keys:
        q, k, v = (torch.randn(1, sizes.heads, n, HEAD_DIM, generator=generator, device=device, dtype=torch.float16)
                   for n in (QUERIES, keys, keys))
        key_mask = torch.ones(1, keys, dtype=torch.bool, device=device)
        key_mask[0, :keys // 20] = False  # left padding
        want = reference.cached_attention(q, k, v, key_mask=key_mask)
        got = triton_kernels.cached_attention(q, k, v, key_mask=key_mask)
        bias = torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :]
        as_bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]
        rows.append({"kernel": "cached_attention", "shape": f"H{sizes.heads} Lq{QUERIES} Lk{keys} D{HEAD_DIM} fp16",
                     "max_abs_err": float((got.float() - want.float()).abs().max()),
                     "kernel_ms": milliseconds(lambda: triton_kernels.cached_attention(q, k, v, key_mask=key_mask),
                                               device, sizes.repeats),
                     "reference_ms": milliseconds(lambda: reference.cached_attention(q, k, v, key_mask=key_mask),
                                                  device, sizes.repeats),
                     "sdpa_bf16_ms": milliseconds(lambda: F.scaled_dot_product_attention(
                         *as_bf16, attn_mask=bias.to(torch.bfloat16)), device, sizes.repeats)})
    for dtype in (torch.float32, torch.float16):
        for batch in (1, 4):
            logits = (3 * torch.randn(batch, QUERIES, sizes.vocab, generator=generator, device=device)).to(dtype)
            eligible = torch.ones(batch, QUERIES, dtype=torch.bool, device=device)
            k = torch.full((batch,), 4, dtype=torch.int64, device=device)
            x0, confidence, commit = triton_kernels.remask_topk(logits, eligible, k)
            x0_ref, confidence_ref, commit_ref = reference.remask_topk(logits, eligible, k)
            rows.append({"kernel": "remask_topk", "shape": f"B{batch} L{QUERIES} V{sizes.vocab} {str(dtype)[6:]}",
                         "max_abs_err": float((confidence - confidence_ref).abs().max()),
                         "same_commits": bool(torch.equal(x0, x0_ref) and torch.equal(commit, commit_ref)),
                         "kernel_ms": milliseconds(lambda: triton_kernels.remask_topk(logits, eligible, k), device,
                                                   sizes.repeats),
                         "reference_ms": milliseconds(lambda: reference.remask_topk(logits, eligible, k), device,
                                                      sizes.repeats)})
    return rows


# ---- speed ------------------------------------------------------------------------------------------------------

def speed_rows(device: torch.device, sizes: Sizes) -> dict:
    """A full pass and a dual-cache step at two layer counts; per layer, extrapolated, and the weight-read floor."""
    from llada_v import LladaV, LladaVConfig
    from llada_v.config import LanguageConfig
    from runtime.backends.pytorch import TorchRunner

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timings = {}
    for layers in sizes.layers:
        language = LanguageConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                                  num_hidden_layers=layers, num_attention_heads=sizes.hidden // HEAD_DIM,
                                  num_key_value_heads=sizes.hidden // HEAD_DIM,
                                  max_position_embeddings=2 * sizes.sequence)
        with torch.device(device):
            model = LladaV(LladaVConfig(language=language, vision=None)).to(dtype).eval()
        runner = TorchRunner.from_model(model)
        timings[layers] = pass_times(runner, sizes, device)
        weights = sum(p.numel() * p.element_size() for p in model.denoiser.layers[0].parameters())
        head = model.denoiser.lm_head.weight.numel() * model.denoiser.lm_head.weight.element_size()
        del model, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    few, many = sizes.layers
    bandwidth = copy_bandwidth(device)
    result = {"dtype": str(dtype)[6:], "layer_weight_bytes": weights, "head_weight_bytes": head,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "sequence": sizes.sequence, "queries": QUERIES, "passes": {}}
    for name in ("full_pass", "dual_step"):
        per_layer = (timings[many][name] - timings[few][name]) / (many - few)
        rest = timings[few][name] - few * per_layer  # embedding, head, the loop's own ops
        floor = weights / bandwidth
        result["passes"][name] = {
            "ms_per_layer": per_layer * 1e3, "ms_outside_layers": rest * 1e3,
            "ms_at_32_layers": (rest + LLADA_8B_LAYERS * per_layer) * 1e3,
            "weight_read_floor_ms_per_layer": floor * 1e3, "over_floor": per_layer / floor,
            "seconds": {layers: timings[layers][name] for layers in sizes.layers}}
    return result


@torch.inference_mode()
def pass_times(runner, sizes: Sizes, device: torch.device) -> dict[str, float]:
    """Median seconds of a full pass over `sequence` positions and of a dual-cache step of 32 queries."""
    lm, length = runner.config.language, sizes.sequence
    generator = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(1, length, lm.hidden_size, generator=generator, device=device).to(runner.dtype)
    positions = torch.arange(length, device=device)[None]
    mask = torch.ones(1, length, dtype=torch.int64, device=device)
    block = torch.arange(QUERIES, device=device)[None]
    _, keys, values = runner.denoise_full(embeds, positions, mask, block)
    start = length - QUERIES
    past_mask = mask.clone()
    past_mask[:, start:] = 0

    def full():
        runner.denoise_full(embeds, positions, mask, block)

    def dual():
        runner.denoise_cached(embeds[:, start:], positions[:, start:], mask[:, start:], block, keys, values,
                              past_mask, start)

    return {"full_pass": milliseconds(full, device, sizes.repeats) / 1e3,
            "dual_step": milliseconds(dual, device, sizes.repeats) / 1e3}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    size = (1 << 30) if device.type == "cuda" else (64 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = milliseconds(lambda: target.copy_(source), device, 5) / 1e3
    return 2 * size / seconds


def milliseconds(run, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `run` after a warm-up call (CUDA events on a GPU)."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---- the table --------------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"device: {m['device']} | torch {m['torch']} (CUDA {m['cuda']}) | triton {m['triton']} | onnxruntime "
             f"{m['onnxruntime']} {m['onnxruntime_providers']} | tensorrt {m['tensorrt']}", "",
             "| path | decoding | questions | token agreement with CPU fp32 | answers equal | seconds |",
             "|---|---|---|---|---|---|"]
    for row in report["answers"]:
        if "skipped" in row or "failed" in row:
            lines.append(f"| {row['path']} | {'skipped' if 'skipped' in row else 'FAILED'}: "
                         f"{row.get('skipped') or row.get('failed')} | | | | |")
        else:
            lines.append(f"| {row['path']} | {row['decoding']} | {row['questions']} | {row['token_agreement']:.1%} | "
                         f"{row['answers_equal']}/{row['questions']} | {row['seconds']:.1f} |")
    lines += ["", "| kernel | shape | max abs error vs reference | kernel ms | reference ms | other |", "|---|---|---|---|---|---|"]
    for row in report["kernels"]:
        other = f"SDPA bf16 {row['sdpa_bf16_ms']:.3f} ms" if "sdpa_bf16_ms" in row else \
            f"same commits: {row['same_commits']}"
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['max_abs_err']:.2e} | {row['kernel_ms']:.3f} | "
                     f"{row['reference_ms']:.3f} | {other} |")
    speed = report["speed"]
    lines += ["", f"random model of LLaDA-8B's layer width ({speed['dtype']}, {speed['layer_weight_bytes'] / 1e6:.0f} MB "
                  f"per layer), copy bandwidth {speed['copy_bandwidth_gb_s']:.0f} GB/s; full pass {speed['sequence']} "
                  f"positions, dual step {speed['queries']} queries against {speed['sequence']} slots",
              "| pass | ms per layer | weight-read floor per layer | x floor | ms at 32 layers (+ head) |",
              "|---|---|---|---|---|"]
    for name, p in speed["passes"].items():
        lines.append(f"| {name} | {p['ms_per_layer']:.3f} | {p['weight_read_floor_ms_per_layer']:.3f} | "
                     f"{p['over_floor']:.1f}x | {p['ms_at_32_layers']:.1f} |")
    lines.append(f"\n{report['seconds']:.0f} s in all")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
