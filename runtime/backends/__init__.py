"""Engine backends: one Runner per way of running the parts (ONNX Runtime, TensorRT, PyTorch), and the engines
folder they read. This registry is the one place that knows them: their names, the device each runs on unless
told, and how each is made. Importing it loads none of them.

To add a backend: a Runner subclass in a module here and its entry below (docs/extending.md).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

# name -> (module, Runner class, the device it runs on unless told)
_REGISTRY = {"onnxruntime": ("onnx_runtime", "OnnxRuntimeRunner", "cpu"),
             "tensorrt": ("tensorrt", "TensorRTRunner", "cuda"),
             "torch": ("pytorch", "TorchRunner", "cpu")}
BACKENDS = tuple(_REGISTRY)


def default_device(backend: str) -> str:
    check_backend(backend)
    return _REGISTRY[backend][2]


def check_backend(backend: str) -> None:
    if backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def load_runner(path: str | Path, backend: str, device: str | None = None, **options):
    """The backend's Runner over `path` (an engines folder, or a checkpoint folder for "torch") on `device` (default:
    default_device). options: what that backend's runner takes besides (torch: dtype, fused_cache; onnxruntime:
    providers)."""
    check_backend(backend)
    module, name, device_unless_told = _REGISTRY[backend]
    runner = getattr(importlib.import_module(f".{module}", __name__), name)
    unknown = set(options) - set(inspect.signature(runner).parameters)
    if unknown:
        raise ValueError(f"backend {backend!r} takes no {', '.join(sorted(unknown))} option")
    return runner(path, device or device_unless_told, **options)
