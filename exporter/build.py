"""Checkpoint -> engines folder (docs/engines.md): export every part to ONNX, validate it against the
float32 PyTorch model, optionally build TensorRT engines, write embeddings, config, tokenizer and
manifest.

The folder is assembled in a hidden staging folder beside `out_dir` and renamed into place only when
everything succeeded; on any failure (interrupt included) the staging folder is removed and an
existing `out_dir` is left as it was. Every part is exported before any is validated so that the
export-precision model can be freed before the float32 reference is loaded (two full copies of an
8B model plus an ONNX Runtime session would not fit otherwise).
"""

from __future__ import annotations

import gc
import os
import secrets
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

import llada_v
from llada_v import CheckpointError, LladaV, LladaVConfig
from llada_v.weights import checkpoint_config, checkpoint_files, copy_tokenizer

from . import trt_build
from .manifest import EMBEDDINGS_FILE, Manifest, PartEntry, checkpoint_sha256
from .onnx_export import EXTERNAL_DATA_THRESHOLD, PRECISIONS, TORCH_DTYPES, dim_ranges, export_part, part_specs
from .trt_build import EngineBuildError
from .validate import ValidationError, validate_part
from .wrappers import wrap

BACKENDS = ("onnx", "tensorrt")
# The cached denoiser reuses the full one's external weight file (identical initializers).
SHARES_WEIGHTS_WITH = {"denoiser_cached": "denoiser_full"}

__all__ = ["BACKENDS", "BuildError", "EngineBuildError", "ValidationError", "build_engines"]


class BuildError(ValueError):
    """The build request is wrong: bad checkpoint, precision, backend or output folder. Nothing was written."""


def build_engines(model_dir: Path | None, out_dir: Path, precision: str = "fp16", backend: str = "onnx",
                  force: bool = False, progress: bool = True, *,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Build the engines folder of a checkpoint (the shipped model when model_dir is None); returns out_dir.

    Raises BuildError for bad input, ValidationError when a part exceeds its tolerance, and
    EngineBuildError when TensorRT fails; in every case nothing is left behind. `force` replaces an
    existing non-empty out_dir (only once the new build succeeded). Parts whose weights exceed
    external_data_threshold bytes keep them in `<part>.onnx_data`.
    """
    log = _Progress(progress)
    model_dir = Path(model_dir) if model_dir is not None else llada_v.SHIPPED_MODEL_DIR
    out_dir = Path(out_dir).absolute()
    cfg = _check_request(model_dir, out_dir, precision, backend, force)
    start = time.perf_counter()
    with log.step(f"loading {model_dir} ({precision})"):
        model = _load(model_dir, TORCH_DTYPES[PRECISIONS[precision]])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}-{secrets.token_hex(3)}")
    staging.mkdir()
    try:
        manifest = Manifest(precision, model_dir.absolute(), cfg.language.max_position_embeddings)
        _export_all(model, cfg, precision, staging, manifest, external_data_threshold, log)
        _write_support_files(model, cfg, model_dir, staging)
        if precision != "fp32":
            del model
            gc.collect()
            with log.step("loading the float32 reference"):
                model = _load(model_dir, torch.float32)
        _validate_all(model, cfg, precision, staging, manifest, log)
        if backend == "tensorrt":
            _build_plans(cfg, staging, out_dir, manifest, log)
        with log.step("hashing the checkpoint's weights"):
            manifest.checkpoint_sha256 = checkpoint_sha256(model_dir)
        manifest.save(staging)
        _apply_umask(staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.line(f"built {out_dir} ({precision}, {backend}: {', '.join(manifest.parts)}) "
             f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def _check_request(model_dir: Path, out_dir: Path, precision: str, backend: str, force: bool) -> LladaVConfig:
    """Everything that can be checked before any work; returns the checkpoint's config."""
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt" and (reason := trt_build.unavailable_reason()):
        raise BuildError(reason)
    if not model_dir.is_dir():
        raise BuildError(f"checkpoint folder {model_dir} does not exist")
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise BuildError(f"output folder {out_dir} already exists and is not empty: use --force to replace it")
    checkpoint = model_dir.resolve()
    if out_dir.resolve() == checkpoint or out_dir.resolve() in checkpoint.parents:
        raise BuildError(f"output folder {out_dir} would replace the checkpoint {model_dir}: choose another --out")
    if not (model_dir / "tokenizer.json").is_file():
        raise BuildError(f"{model_dir} has no tokenizer.json: the engines folder must carry the checkpoint's tokenizer")
    try:
        cfg = checkpoint_config(model_dir)
        checkpoint_files(model_dir)  # reads the safetensors headers: missing, truncated or foreign files
    except CheckpointError as err:
        raise BuildError(str(err)) from err
    return cfg


def _load(model_dir: Path, dtype: torch.dtype) -> LladaV:
    try:
        return llada_v.load_model(model_dir, dtype=dtype)
    except CheckpointError as err:
        raise BuildError(str(err)) from err


def _export_all(model: LladaV, cfg: LladaVConfig, precision: str, staging: Path, manifest: Manifest,
                external_data_threshold: int, log: "_Progress") -> None:
    ranges = dim_ranges(cfg)
    for name, spec in part_specs(cfg, precision).items():
        graph = wrap(name, model)
        weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
        owner = SHARES_WEIGHTS_WITH.get(name)
        with log.step(f"exporting {name}.onnx"):
            files = export_part(graph, spec, staging, external_data=weight_bytes > external_data_threshold,
                                share_weights_with=staging / f"{owner}.onnx" if owner else None)
        manifest.parts[name] = PartEntry(spec, files, {d: ranges[d] for d in spec.dims})


def _write_support_files(model: LladaV, cfg: LladaVConfig, model_dir: Path, staging: Path) -> None:
    """Embeddings (in the engines' precision), config and tokenizer: what the runtime needs besides the parts."""
    tensors = {"embed_tokens": model.denoiser.embed_tokens.weight}
    if cfg.has_vision:
        tensors["image_newline"] = model.image_newline
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, staging / EMBEDDINGS_FILE)
    cfg.save(staging / "config.json")
    copy_tokenizer(model_dir, staging)


def _validate_all(reference: LladaV, cfg: LladaVConfig, precision: str, staging: Path, manifest: Manifest,
                  log: "_Progress") -> None:
    for name, spec in part_specs(cfg, precision).items():
        with log.step(f"validating {name} with ONNX Runtime") as status:
            result = validate_part(staging / f"{name}.onnx", spec, reference, precision)
            status.note = result.summary()
        manifest.validation[name] = result.to_dict()
        if not result.passed:
            raise ValidationError(f"{result.summary()}; nothing was written")


def _build_plans(cfg: LladaVConfig, staging: Path, out_dir: Path, manifest: Manifest, log: "_Progress") -> None:
    timing_cache = staging / trt_build.TIMING_CACHE_FILE
    if (out_dir / trt_build.TIMING_CACHE_FILE).is_file():
        shutil.copy2(out_dir / trt_build.TIMING_CACHE_FILE, timing_cache)
    for name, part in manifest.parts.items():
        with log.step(f"building TensorRT engine {name}.plan"):
            trt_build.build_engine(staging / part.files[0], part.spec, part.dims, staging / f"{name}.plan",
                                   timing_cache)
        part.plan = f"{name}.plan"


def _apply_umask(folder: Path) -> None:
    """Give every file the mode the user's umask implies: onnx and safetensors create some with 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename staging to out_dir; an existing out_dir is moved aside first and removed only afterwards."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = staging.with_name(staging.name + ".old")
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old)


class _Status:
    note: str = ""


class _Progress:
    """One line per step on stderr: what runs, then how long it took."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def line(self, text: str, end: str = "\n") -> None:
        if self.enabled:
            print(text, end=end, file=sys.stderr, flush=True)

    @contextmanager
    def step(self, label: str):
        start, status = time.perf_counter(), _Status()
        self.line(f"{label} ...", end="")
        try:
            yield status
        except BaseException:
            self.line(" failed")
            raise
        self.line(f" {time.perf_counter() - start:.1f} s" + (f"  [{status.note}]" if status.note else ""))
