"""LLaDA-V checkpoint -> engines folder: ONNX parts validated against PyTorch, optional TensorRT plans.

`python -m exporter build --precision fp16` or `exporter.build_engines(model_dir, out_dir, ...)`;
the folder's layout is in docs/engines.md.
"""

from .build import BuildError, EngineBuildError, ValidationError, build_engines
from .manifest import load_manifest

__all__ = ["BuildError", "EngineBuildError", "ValidationError", "build_engines", "load_manifest"]
