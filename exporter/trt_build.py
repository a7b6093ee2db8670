"""ONNX part -> TensorRT engine (`<part>.plan`). Needs an NVIDIA GPU and the `tensorrt` package.

The network is strongly typed (TensorRT 11 always is, and removed BuilderFlag.FP16): every tensor
keeps the dtype the ONNX graph gives it, so fp16 engines come from fp16 graphs and the fp32 norms,
softmax statistics and RoPE stay fp32. fp32 engines are built without TF32 (on by default), which rounds
matmul inputs to 10-bit mantissas: fp32 engines must give the float32 model's tokens. One optimization
profile per entry of profiles.part_profiles (the denoiser's full and cached passes), with min / opt / max
from the build's limits. A timing cache shared by all parts (and reused from the folder a `--force`
build replaces) skips re-timing layers. `tensorrt` is imported only when an engine is built, so the
rest of the exporter runs without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .onnx_export import PartSpec
from .profiles import Profiles

TIMING_CACHE_FILE = "trt_timing.cache"
INSTALL_HINT = "pip install '.[gpu]'"


def unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built here, or None when they can."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the `tensorrt` package is not installed")
    if not missing:
        return None
    return (f"--backend tensorrt needs an NVIDIA GPU and the `tensorrt` package ({INSTALL_HINT}); "
            f"here {' and '.join(missing)}")


class EngineBuildError(RuntimeError):
    """TensorRT could not parse a part or build its engine."""


def plan_device():
    """The GPU the engines are built for and checked on: the current CUDA device."""
    import torch

    return torch.device("cuda", torch.cuda.current_device())


def gpu_memory_bytes() -> int:
    """The memory of the GPU the engines are built on."""
    import torch

    return torch.cuda.get_device_properties(plan_device()).total_memory


def build_engine(onnx_path: Path, spec: PartSpec, profiles: Profiles, precision: str, plan_path: Path,
                 timing_cache: Path) -> None:
    """Write the engine of one ONNX part to plan_path; timing_cache is read if present and rewritten."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Required for strong typing on TensorRT 10.x, accepted and ignored on 11.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for name, ranges in profiles.items():
        profile = builder.create_optimization_profile()
        for tensor in spec.inputs:
            shapes = [tensor.concrete_shape({d: getattr(r, level) for d, r in ranges.items()})
                      for level in ("min", "opt", "max")]
            profile.set_shape(tensor.name, *shapes)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT refused the {name!r} optimization profile of {onnx_path.name}")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    plan_path.write_bytes(memoryview(serialized))
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
