"""Checkpoint -> engines folder (docs/engines.md): export every part to ONNX, validate it against the
float32 PyTorch model, optionally build TensorRT engines, write embeddings, config, tokenizer and
manifest.

The folder is assembled in a hidden staging folder beside `out_dir` and renamed into place only when
everything succeeded; on any failure (interrupt included) the staging folder is removed and an
existing `out_dir` is left as it was. The build holds one large thing at a time (see _assemble): two
full copies of an 8B model, or a model and an ONNX Runtime session, would not fit where it must run.

Beside `out_dir` (named after it, all hidden): `.<out>.lock`, held with flock for the whole build;
`.<out>.building-<pid>-<hex>`, the staging folder; `.<out>.old`, the previous folder while the new one
is renamed into place. A build killed with SIGKILL leaves its staging folder (and, killed while
publishing, the `.old` one), which the next build cleans up; its lock file stays too, unlocked by the
kernel, and the next build reuses it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

import llada_v
from llada_v import CheckpointError, LladaVConfig
from llada_v.weights import CheckpointReader, copy_tokenizer, load_model_streaming, release_freed_memory

from . import trt_build
from .engines_format import EMBEDDINGS_FILE, MANIFEST_FILE, TARGETS, moved_aside
from .manifest import Manifest, PartEntry, checkpoint_sha256
from .onnx_export import EXTERNAL_DATA_THRESHOLD, PRECISIONS, TORCH_DTYPES, finish_part, part_specs, trace_part
from .profiles import (ENGINE_BYTES_PER_WEIGHT, EngineLimits, activation_table, default_limits, part_profiles,
                       weight_count)
from .quantize import BITS, dequantize_into
from .trt_build import EngineBuildError
from .validate import ValidationError, check_part, check_plan, reference_cases
from .wrappers import weightless_model, wrap

__all__ = ["BuildError", "EngineBuildError", "ValidationError", "build_engines"]


class BuildError(ValueError):
    """The build cannot be done as asked: bad checkpoint, precision or backend, an output folder that may not
    be replaced or cannot be written (permissions, disk full), or another build into it running. Nothing was
    written."""


def build_engines(model_dir: Path | None, out_dir: Path, precision: str = "fp16", backend: str = "onnx",
                  force: bool = False, progress: bool = True, *, max_batch: int | None = None,
                  max_sequence: int | None = None, max_block: int | None = None, max_gen_length: int | None = None,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Build the engines folder of a checkpoint (the shipped model when model_dir is None); returns out_dir.

    max_batch, max_sequence, max_block, max_gen_length: what one call of the engines may take (profiles.py);
    each one not given gets its default (profiles.default_limits: sized for an 80 GB GPU).

    Raises BuildError for bad input, ValidationError when a part exceeds its tolerance, and
    EngineBuildError when TensorRT fails; in every case nothing is left behind. An existing out_dir is
    replaced (only once the new build succeeded) when it is empty, or with `force` when it is an engines
    folder (it has a manifest.json); anything else is refused. While a build runs, a second build into
    the same out_dir is refused, not queued. Parts whose weights exceed external_data_threshold bytes
    keep them in `<part>.onnx_data`.
    """
    log = _Progress(progress)
    model_dir = Path(model_dir) if model_dir is not None else llada_v.SHIPPED_MODEL_DIR
    out_dir = Path(os.path.abspath(out_dir))  # abspath, not absolute(): `..` must not stay in the name
    reader = _check_request(model_dir, out_dir, precision, backend)
    limits = _engine_limits(reader.cfg, precision, backend, max_batch, max_sequence, max_block, max_gen_length, log)
    start = time.perf_counter()
    try:
        with _parent_folders(out_dir), _build_lock(out_dir):
            _remove_stale_staging(out_dir)
            _finish_killed_publish(out_dir)
            if reason := _replace_refusal(out_dir, force):
                raise BuildError(reason)
            with _staging_folder(out_dir) as staging:
                manifest = _assemble(reader, precision, backend, limits, staging, out_dir, external_data_threshold,
                                     log)
                _publish(staging, out_dir, force)
    except CheckpointError as err:  # a shard that became unreadable during the build (the headers were checked)
        raise BuildError(f"{err}; nothing was written") from err
    except OSError as err:
        hint = "free some space or choose another --out" if err.errno == errno.ENOSPC else "choose another --out"
        raise BuildError(f"cannot write the engines folder {out_dir} ({err}): {hint}; nothing was written") from err
    except MemoryError as err:
        needed = PROCESS_BYTES + weight_count(reader.cfg) * BUILD_BYTES_PER_WEIGHT[precision]
        raise BuildError(f"ran out of memory building the engines of {model_dir}: a {precision} build needs about "
                         f"{needed / 1e9:.0f} GB of memory; free memory or build on a larger machine; nothing was "
                         f"written") from err
    log.line(f"built {out_dir} ({precision}, {backend}: {', '.join(manifest.parts)}) "
             f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def _check_request(model_dir: Path, out_dir: Path, precision: str, backend: str) -> CheckpointReader:
    """Everything that can be checked before touching the disk; returns the checkpoint's reader (checked: every
    tensor there, in its shape)."""
    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend not in TARGETS:
        raise BuildError(f"unknown backend {backend!r}: choose one of {', '.join(TARGETS)}")
    if backend == "tensorrt" and precision in BITS:
        raise BuildError(f"--precision {precision} gives ONNX Runtime's MatMulNBits nodes, which TensorRT's ONNX "
                         f"parser does not take: use --backend onnx (ONNX Runtime, CPU or CUDA), or fp16 for TensorRT")
    if backend == "tensorrt" and (reason := trt_build.unavailable_reason()):
        raise BuildError(reason)
    if not model_dir.is_dir():
        raise BuildError(f"checkpoint folder {model_dir} does not exist")
    _check_out_path(out_dir)
    checkpoint = model_dir.resolve()
    if out_dir.resolve() == checkpoint or out_dir.resolve() in checkpoint.parents:
        raise BuildError(f"output folder {out_dir} would replace the checkpoint {model_dir}: choose another --out")
    if not (model_dir / "tokenizer.json").is_file():
        raise BuildError(f"{model_dir} has no tokenizer.json: the engines folder must carry the checkpoint's tokenizer")
    try:
        reader = CheckpointReader(model_dir)  # reads the safetensors headers: missing, truncated or foreign files
        reader.check()
    except CheckpointError as err:
        raise BuildError(str(err)) from err
    _check_disk(reader.cfg, precision, out_dir)
    return reader


# Peak build memory per weight above the build's fixed cost (PROCESS_BYTES: Python, torch, ONNX Runtime, transformers),
# measured by benchmarks/scale.py on a 0.95B model (2026-12-04; the ratios are lower at 3B): the validation session for
# fp32, fp16 (the CPU provider's fp32 casts) and int8, the exporter's trace for int4.
BUILD_BYTES_PER_WEIGHT = {"fp32": 4.1, "fp16": 2.6, "int8": 1.5, "int4": 1.0}
PROCESS_BYTES = 0.6e9


def _engine_limits(cfg: LladaVConfig, precision: str, backend: str, max_batch: int | None, max_sequence: int | None,
                   max_block: int | None, max_gen_length: int | None, log: "_Progress") -> EngineLimits:
    """The limits asked for, the others defaulted; with TensorRT, refused when the engines would not fit this GPU
    at their largest shapes."""
    asked = {"--max-batch": max_batch, "--max-sequence": max_sequence, "--max-block": max_block,
             "--max-gen-length": max_gen_length}
    for flag, value in asked.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BuildError(f"{flag} must be a positive integer, got {value!r}")
    if max_sequence is not None and max_sequence > cfg.language.max_position_embeddings:
        raise BuildError(f"--max-sequence {max_sequence} exceeds the model's {cfg.language.max_position_embeddings} "
                         f"positions (max_position_embeddings)")
    try:
        limits = default_limits(cfg, precision, max_sequence, max_block, max_gen_length, max_batch)
    except ValueError as err:
        raise BuildError(f"{err}: change --max-block, --max-gen-length or --max-sequence") from err
    table = activation_table(cfg, precision, limits)
    weights = weight_count(cfg) * ENGINE_BYTES_PER_WEIGHT[precision]
    part, profile, largest = max(table, key=lambda row: row[2])
    log.line(f"engine limits: batch {limits.max_batch}, sequence {limits.max_sequence}, block {limits.max_block}, "
             f"prefix-cache queries {limits.max_gen_length}; at the largest shapes the {part} {profile} pass needs "
             f"~{largest / 1e9:.1f} GB of activations and I/O beside {weights / 1e9:.1f} GB of weights")
    if backend == "tensorrt" and weights + largest > (gpu := trt_build.gpu_memory_bytes()):
        raise BuildError(f"the engines need ~{(weights + largest) / 1e9:.1f} GB at their largest shapes ({part} "
                         f"{profile} pass: batch {limits.max_batch}, sequence {limits.max_sequence}), more than this "
                         f"GPU's {gpu / 1e9:.1f} GB: lower --max-batch (now {limits.max_batch}) or --max-sequence "
                         f"(now {limits.max_sequence})")
    return limits


def _check_disk(cfg: LladaVConfig, precision: str, out_dir: Path) -> None:
    """Refuse up front when the disk cannot hold the build: at its peak a part's traced graph (in the export
    dtype; int8/int4 are traced in float32) and its finished files are both on disk; 10% on top for the
    embedding table, the graphs' structure and the tokenizer."""
    params = weight_count(cfg)
    traced = TORCH_DTYPES[PRECISIONS[precision]].itemsize
    needed = 1.1 * params * (traced + ENGINE_BYTES_PER_WEIGHT[precision])
    folder = next(folder for folder in out_dir.parents if folder.exists())
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BuildError(f"the build needs about {needed / 1e9:.1f} GB free at {folder} ({params / 1e9:.2f}B "
                         f"weights, traced at {traced} bytes each and written at "
                         f"{ENGINE_BYTES_PER_WEIGHT[precision]:g}), {free / 1e9:.1f} GB are free: free some space "
                         f"or choose another --out; nothing was written")


def _check_out_path(out_dir: Path) -> None:
    """Where out_dir is, whatever it holds: not the current folder or one above it, not under a file."""
    cwd = Path.cwd().resolve()
    if out_dir.resolve() == cwd or out_dir.resolve() in cwd.parents:
        raise BuildError(f"output folder {out_dir} is the current folder or one above it: give a folder below it "
                         f"to create or replace, e.g. --out engines")
    existing = next(folder for folder in out_dir.parents if folder.exists())
    if not existing.is_dir():
        raise BuildError(f"output folder {out_dir} would be inside {existing}, which is a file: choose another --out")


def _replace_refusal(out_dir: Path, force: bool) -> str | None:
    """Why out_dir may not be replaced, or None: an empty folder always may, an engines folder with `force`."""
    if out_dir.is_symlink():
        return (f"output {out_dir} is a symbolic link (to {os.readlink(out_dir)}): give the folder it points to "
                f"as --out")
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        return f"output {out_dir} exists and is not a folder: choose another --out"
    if not any(out_dir.iterdir()):
        return None
    if not (out_dir / MANIFEST_FILE).is_file():
        return (f"output folder {out_dir} is not empty and not an engines folder (it has no {MANIFEST_FILE}): "
                f"choose another --out (--force replaces only engines folders)")
    if not force:
        return f"output folder {out_dir} already holds engines: use --force to replace them"
    return None


@contextmanager
def _parent_folders(out_dir: Path):
    """Create out_dir's missing parent folders; remove them again if the build fails."""
    missing = [folder for folder in out_dir.parents if not folder.exists()]  # deepest first
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in missing:
            with suppress(OSError):  # not empty: someone else wrote there meanwhile
                folder.rmdir()
        raise


@contextmanager
def _build_lock(out_dir: Path):
    """Hold an exclusive flock on `.<out>.lock` beside out_dir; refuse if another build holds it."""
    path = out_dir.with_name(f".{out_dir.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BuildError(f"another build into {out_dir} is running (it holds {path}): wait for it to finish "
                             f"or choose another --out") from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the one now there
    try:
        yield
    finally:
        if _is_file_at(fd, path):
            path.unlink()  # before unlocking: a build waiting on this file then sees it is gone
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _staging_folders(out_dir: Path) -> dict[Path, int]:
    """The staging folders of builds into out_dir, with the id of the process that made each."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.building-(\d+)-[0-9a-f]+")
    return {path: int(match[1]) for path in out_dir.parent.iterdir() if (match := pattern.fullmatch(path.name))}


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove the staging folders a killed build left (gigabytes for an 8B model)."""
    for path, pid in _staging_folders(out_dir).items():
        if pid == os.getpid() or not _process_exists(pid):  # our own pid: reused after the killed build
            shutil.rmtree(path)
            _notice(f"removed {path}, left by build process {pid}, which is gone")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def _finish_killed_publish(out_dir: Path) -> None:
    """A build killed inside _publish leaves the previous folder in `.<out>.old`: restore it if out_dir is
    gone (killed between the two renames), remove it if the new out_dir is already in place."""
    old = moved_aside(out_dir)
    if not os.path.lexists(old):
        return
    if os.path.lexists(out_dir):
        shutil.rmtree(old)
        _notice(f"removed {old}, the previous engines a killed build had already replaced")
    else:
        old.rename(out_dir)
        _notice(f"restored {out_dir} from {old}, where a killed build had moved it")


@contextmanager
def _staging_folder(out_dir: Path):
    """A fresh hidden folder beside out_dir, removed on exit unless _publish renamed it into place."""
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}-{secrets.token_hex(3)}")
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _assemble(reader: CheckpointReader, precision: str, backend: str, limits: EngineLimits, staging: Path,
              out_dir: Path, external_data_threshold: int, log: "_Progress") -> Manifest:
    """Write the whole engines folder into staging; returns its manifest (saved there too).

    One large thing in memory at a time: the graphs are traced from a model without weights
    (wrappers.weightless_model) and each weight is read from the checkpoint as it is written; then one
    part's graph while it is written (quantized one weight at a time), then the float32 reference while it
    computes the expected outputs, then one ONNX Runtime session while it is compared with them."""
    model_dir, cfg = reader.folder, reader.cfg
    specs = part_specs(cfg, precision)
    dtype = TORCH_DTYPES[PRECISIONS[precision]]
    model, weights = weightless_model(cfg, dtype), partial(_checkpoint_weight, reader)
    traced = {}
    for name, spec in specs.items():
        graph = wrap(name, model)
        weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
        with log.step(f"tracing {name}"):
            traced[name] = trace_part(graph, spec, staging, weights), weight_bytes > external_data_threshold
        release_freed_memory()
    _write_support_files(reader, precision, staging)
    manifest = Manifest(precision, cfg.family, model_dir.absolute(), limits)
    profiles = part_profiles(cfg, limits)
    for name, (path, external) in traced.items():
        with log.step(f"writing {name}.onnx" + (f" ({precision} weights)" if precision in BITS else "")):
            files = finish_part(path, specs[name], staging, external, precision)
        release_freed_memory()
        manifest.parts[name] = PartEntry(specs[name], files, profiles[name])
    cases = _validate_all(model_dir, specs, precision, limits, staging, manifest, log)
    if backend == "tensorrt":
        _build_plans(staging, out_dir, manifest, log)
        _validate_plans(specs, cases, staging, manifest, log)
    with log.step("hashing the checkpoint's weights"):
        manifest.checkpoint_sha256 = checkpoint_sha256(model_dir)
    manifest.save(staging)
    _apply_umask(staging)
    return manifest


def _checkpoint_weight(reader: CheckpointReader, name: str) -> torch.Tensor:
    """A traced parameter, read from the checkpoint in its stored dtype (trace_part converts it as it writes):
    `X.weight_t` of a TransposedLinear is X.weight transposed."""
    if name.endswith(".weight_t"):
        return reader.tensor(name.removesuffix("_t"), None).t()
    return reader.tensor(name, None)


def _write_support_files(reader: CheckpointReader, precision: str, staging: Path) -> None:
    """Embeddings (in the engines' precision; int8/int4 keep the table in fp16, half an 8B model's 2 GB of
    float32 rows), config and tokenizer: what the runtime needs besides the parts."""
    dtype = TORCH_DTYPES[PRECISIONS[precision]]
    tensors = {"embed_tokens": reader.tensor("denoiser.embed_tokens.weight", torch.float16 if precision in BITS else dtype)}
    if reader.cfg.has_vision:
        tensors["image_newline"] = reader.tensor("image_newline", dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / EMBEDDINGS_FILE)
    reader.cfg.save(staging / "config.json")
    copy_tokenizer(reader.folder, staging)


def _validate_all(model_dir: Path, specs: dict, precision: str, limits: EngineLimits, staging: Path,
                  manifest: Manifest, log: "_Progress") -> dict:
    """The float32 reference computes every part's expected outputs first and is freed; then each part's
    ONNX Runtime session is compared with them, one session at a time. The reference reads each
    transformer layer and the head from the checkpoint while it runs, and only the token embeddings it
    samples (load_model_streaming); for int8/int4 each layer and the head then take the graph's own
    weights, dequantized (quantize.py says why). Returns the cases (small), for the TensorRT plans."""
    quantized = [onnx.load(staging / f"{name}.onnx", load_external_data=False) for name in specs] \
        if precision in BITS else []

    def dequantize(prefix: str, module: torch.nn.Module) -> None:
        for proto in quantized:
            dequantize_into(module, proto, staging, prefix)

    with log.step("loading the float32 reference"):
        reference = load_model_streaming(model_dir, torch.float32, dequantize if quantized else None)
    cases = {}
    for name, spec in specs.items():
        with log.step(f"running the float32 reference for {name}"):
            cases[name] = reference_cases(spec, reference, limits)
    del reference
    release_freed_memory()
    for name, spec in specs.items():
        with log.step(f"validating {name} with ONNX Runtime") as status:
            result = check_part(staging / f"{name}.onnx", spec, cases[name], precision)
            status.note = result.summary()
        release_freed_memory()
        manifest.validation[name] = result.to_dict()
        if not result.passed:
            raise ValidationError(f"{result.summary()}; nothing was written")
    return cases


def _build_plans(staging: Path, out_dir: Path, manifest: Manifest, log: "_Progress") -> None:
    timing_cache = staging / trt_build.TIMING_CACHE_FILE
    if (out_dir / trt_build.TIMING_CACHE_FILE).is_file():
        shutil.copy2(out_dir / trt_build.TIMING_CACHE_FILE, timing_cache)
    for name, part in manifest.parts.items():
        with log.step(f"building TensorRT engine {name}.plan"):
            trt_build.build_engine(staging / part.files[0], part.spec, part.profiles, manifest.precision,
                                   staging / f"{name}.plan", timing_cache)
        part.plan = f"{name}.plan"


def _validate_plans(specs: dict, cases: dict, staging: Path, manifest: Manifest, log: "_Progress") -> None:
    """Each plan on the same inputs as its ONNX part, against the same float32 reference outputs."""
    for name, part in manifest.parts.items():
        with log.step(f"validating {name}.plan with TensorRT") as status:
            result = check_plan(staging / part.plan, specs[name], list(part.profiles), cases[name], manifest.precision,
                                trt_build.plan_device())
            status.note = result.summary()
        manifest.validation[name]["tensorrt"] = result.to_dict()
        if not result.passed:
            raise ValidationError(f"TensorRT engine {result.summary()}; nothing was written")


def _apply_umask(folder: Path) -> None:
    """Give every file the mode the user's umask implies: onnx and safetensors create some with 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(staging: Path, out_dir: Path, force: bool) -> None:
    """Rename staging to out_dir. out_dir is checked again (something may have appeared there during the
    build), moved aside and removed only once staging is in place."""
    if reason := _replace_refusal(out_dir, force):
        raise BuildError(f"{out_dir} changed during the build, so the new engines were discarded: {reason}")
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    old = moved_aside(out_dir)
    out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the build succeeded; a leftover is removed by the next one


def _notice(text: str) -> None:
    """A line about something this build did besides building, printed even without progress lines."""
    print(text, file=sys.stderr, flush=True)


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
