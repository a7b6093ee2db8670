"""LLaDA-V checkpoint -> engines folder: ONNX parts validated against PyTorch, optional TensorRT plans.

`python -m exporter build --precision fp16` or `exporter.build_engines(model_dir, out_dir, ...)`;
the folder's layout is in docs/engines.md. The names are imported on first use (PEP 562), so
`python -m exporter` reaches its own error handling (Ctrl-C included) before torch is imported, and the
runtime imports the folder's contract (exporter.engines_format) without the exporter's own dependencies.
"""

import importlib

_SOURCES = {"BuildError": "build", "EngineBuildError": "build", "ValidationError": "build", "build_engines": "build",
            "load_manifest": "manifest"}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
