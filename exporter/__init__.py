"""LLaDA-V checkpoint -> engines folder: ONNX parts validated against PyTorch, optional TensorRT plans.

`python -m exporter build --precision fp16` or `exporter.build_engines(model_dir, out_dir, ...)`;
the folder's layout is in docs/engines.md. The names below load on first use, so that the runtime can import
the folder's contract (exporter.engines_format) without the exporter's own dependencies.
"""

import importlib

_EXPORTS = {"BuildError": "build", "EngineBuildError": "build", "ValidationError": "build", "build_engines": "build",
            "load_manifest": "manifest"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
