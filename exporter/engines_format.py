"""The engines folder's contract between `exporter/` (which writes it) and `runtime/` (which reads it), with no
dependency beyond the standard library, so that both import it (docs/engines.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT_VERSION = 4
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
# Precision -> dtype of the graphs' activations (and their float inputs and outputs); int8/int4 quantize only
# their weights (exporter/quantize.py), ONNX Runtime's CPU MatMulNBits kernels taking float32 activations.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}
# What a build writes: ONNX parts alone, or TensorRT plans beside them (`python -m exporter build --backend`). Not
# the runtime's backends: a folder of either serves ONNX Runtime, one with plans TensorRT too.
TARGETS = ("onnx", "tensorrt")


def parts(has_vision: bool) -> list[str]:
    """The parts an engines folder holds: the denoiser, and the vision tower and projector of a multimodal model."""
    return ["denoiser", "vision", "projector"] if has_vision else ["denoiser"]


def moved_aside(folder: Path) -> Path:
    """Where a build keeps the previous engines folder while it renames the new one in (exporter/build.py _publish);
    a build killed between the two renames leaves them there, and the runtime says so."""
    return folder.with_name(f".{folder.name}.old")


@dataclass(frozen=True)
class DimRange:
    """Allowed sizes of a symbolic dimension (TensorRT's min / opt / max profile)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class EngineLimits:
    """What one call of the engines may take. max_batch: rows per denoiser call; max_sequence: prompt + answer
    positions; max_block: logits rows per call (the block being decoded); max_gen_length: the queries of a
    prefix-cache pass (the block and the answer after it)."""

    max_batch: int
    max_sequence: int
    max_block: int
    max_gen_length: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_block > self.max_sequence or self.max_gen_length > self.max_sequence:
            raise ValueError(f"max_block {self.max_block} and max_gen_length {self.max_gen_length} must not exceed "
                             f"max_sequence {self.max_sequence}")
        if self.max_block > self.max_gen_length:
            raise ValueError(f"max_block {self.max_block} must not exceed max_gen_length {self.max_gen_length} "
                             f"(a block is part of the answer)")

    def to_dict(self) -> dict:
        return asdict(self)
