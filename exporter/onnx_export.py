"""Graph wrapper -> ONNX file, with every dynamic axis taken from one spec table (`part_specs`).

The spec table names each part's inputs and outputs with their dtypes and shapes; symbolic
dimensions are strings (`num_tiles`, `batch`, `sequence`, `positions`, `past_sequence`) whose
allowed ranges are the optimization profiles of profiles.py. The ONNX dynamic axes, the manifest, the
validation inputs and the TensorRT optimization profiles are all derived from it.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. It is deprecated in favour of
the torch.export-based exporter but still supported by torch 2.13; on this project's graphs it
exports in under a second where the dynamo exporter takes 6-10 s per graph (and Optimum's own
`export_pytorch` also passes `dynamo=False`). Its output is the plain opset-17 op set that ONNX
Runtime and TensorRT's ONNX parser both take. Norms, softmax statistics and RoPE stay float32 in fp16
graphs because the modules cast explicitly; the exporter keeps those Casts.

Optimum (`optimum.exporters.onnx`, checked in optimum 2.1 / optimum-onnx 0.1): not used.
`export`/`export_pytorch` expect a transformers `PreTrainedModel` (it sets `model.config.return_dict`
and applies `OnnxConfig.values_override` and the model patchers registered per HF model type) and
build example inputs through `OnnxConfig.generate_dummy_inputs`, whose dummy generators assume
token ids and `past_key_values.N.key/value` inputs; our graphs take `inputs_embeds`, `logits_index`
and a `past_mask`, and LLaDA-V is not a registered architecture, so an `OnnxConfig` would have to
override nearly every method. The cache does follow its convention of one input and one output per
layer (`past_keys.N`, `present_keys.N`, ...): a stacked [n_layers, ...] tensor would make the graph
split the whole cache into layers (a copy) on every step.
`validate_model_outputs` checks a single input shape with one absolute `atol` via `np.allclose`
and needs dict outputs from the reference model; we need several shapes per part, a tolerance
relative to the output scale for fp16, and the errors recorded in the manifest (see validate.py).
Its way with external data (export, reload, save again with one data file per part) holds the whole
graph in memory; trace_part below never does.

One denoiser graph serves both passes: the cached graph, given an empty cache (past_sequence 0) for
the full pass. A second graph for the full pass would hold a second copy of the weights in every
backend (each ONNX Runtime session and TensorRT engine owns its initializers; ONNX Runtime's Python
API has no shared pre-packed weights container) and double the export and validation time. Its
cost: a full pass joins the attention scores against the empty cache and the fresh keys, a copy of the score
matrix per layer, small beside a layer's matmuls at LLaDA-8B's width (README, Measured choices).

External data: a part whose weights exceed `EXTERNAL_DATA_THRESHOLD` (64 MiB) is saved with its tensors in
`<part>.onnx_data`. The exporter traces the graph
without its weights (trace_part says why); linear layers are traced with their weights stored
transposed (wrappers.transpose_linear_weights), so every weight MatMul reads an initializer directly.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from llada_v import LladaVConfig

from .engines_format import PRECISION_DTYPES
from .quantize import BITS, quantize_file

OPSET = 17
PRECISIONS = PRECISION_DTYPES
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
# Parts with more weight bytes keep them in `<part>.onnx_data`, moved into place from the trace without being
# loaded; inlining them means holding the graph and its serialised copy (2x the part), and protobuf cannot
# serialise a message over 2 GB at all.
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx file (onnx's default threshold)
# A weight is converted to its graph dtype and written this many rows at a time: a transposed LLaDA-8B head's
# rows are 126,464 values, so 32 MB of float32 beside the stored tensor instead of two float32 copies of it.
WRITE_ROWS = 64
ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}
# Example sizes for tracing: all different and all > 1, so no two dynamic axes can be confused.
EXPORT_DIMS = {"num_tiles": 2, "batch": 2, "sequence": 7, "positions": 3, "past_sequence": 11}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64
    shape: tuple[int | str, ...]  # strings are symbolic dimensions

    def concrete_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class PartSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dims(self) -> list[str]:
        """The part's symbolic dimensions, in order of first appearance."""
        names = [d for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str)]
        return list(dict.fromkeys(names))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs}


def part_specs(cfg: LladaVConfig, precision: str) -> dict[str, PartSpec]:
    """The spec table: every part of the engines folder, its inputs and outputs (docs/engines.md)."""
    dtype = PRECISIONS[precision]
    lm = cfg.language
    c, v, n_layers, h, d = lm.hidden_size, lm.vocab_size, lm.num_hidden_layers, lm.num_attention_heads, lm.head_dim
    specs = {}
    if cfg.vision is not None:
        vis = cfg.vision
        tiles, t, cv = "num_tiles", vis.tokens_per_tile, vis.hidden_size
        specs["vision"] = PartSpec(
            "vision",
            inputs=(TensorSpec("pixel_values", "float32", (tiles, vis.num_channels, vis.image_size, vis.image_size)),),
            outputs=(TensorSpec("features", dtype, (tiles, t, cv)),))
        specs["projector"] = PartSpec(
            "projector",
            inputs=(TensorSpec("features", dtype, (tiles, t, cv)),),
            outputs=(TensorSpec("embeddings", dtype, (tiles, t, c)),))
    b, q, p, lc = "batch", "sequence", "positions", "past_sequence"

    def per_layer(name: str, shape: tuple) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(f"{name}.{i}", dtype, shape) for i in range(n_layers))

    queries = (TensorSpec("inputs_embeds", dtype, (b, q, c)), TensorSpec("position_ids", "int64", (b, q)),
               TensorSpec("attention_mask", "int64", (b, q)), TensorSpec("logits_index", "int64", (b, p)))
    past = (*per_layer("past_keys", (b, h, lc, d)), *per_layer("past_values", (b, h, lc, d)),
            TensorSpec("past_mask", "int64", (b, lc)))
    outputs = (TensorSpec("logits", "float32", (b, p, v)),
               *per_layer("present_keys", (b, h, q, d)), *per_layer("present_values", (b, h, q, d)))
    specs["denoiser"] = PartSpec("denoiser", inputs=queries + past, outputs=outputs)
    return specs


def trace_part(graph: nn.Module, spec: PartSpec, out_dir: Path,
               weights: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Trace the part into a scratch folder in out_dir: `.<part>.export/model.onnx`, its weights in
    `<part>.onnx_data` beside it; returns model.onnx. The exporter runs with export_params=False, so it
    never holds the weights itself (with them it keeps a serialised copy of a graph under 2 GB, and
    writes a file per tensor above); the weights are then written one tensor at a time, each asked of
    `weights` by its parameter name in `graph` (default: the graph's own parameters; the build reads them
    from the checkpoint and traces a wrappers.weightless_model). finish_part turns the scratch folder into
    the part's files."""
    if weights is None:
        weights = dict(graph.named_parameters()).__getitem__
    scratch = out_dir / f".{spec.name}.export"
    scratch.mkdir()
    try:
        _trace_to_onnx(graph, spec, scratch / "model.onnx")
        proto = onnx.load(scratch / "model.onnx")  # the graph alone: its weights are still inputs
        _weights_to_initializers(proto, spec, dict(graph.named_parameters()), weights, scratch,
                                 f"{spec.name}.onnx_data")
        onnx.save_model(proto, scratch / "model.onnx")
    except BaseException:
        shutil.rmtree(scratch)
        raise
    return scratch / "model.onnx"


def finish_part(traced: Path, spec: PartSpec, out_dir: Path, external_data: bool, precision: str) -> list[str]:
    """Write `<spec.name>.onnx` (and `<spec.name>.onnx_data`) into out_dir from trace_part's scratch folder,
    its weights quantized for int8/int4, and remove the scratch folder; returns the files the part needs.
    A float part with external data is moved into place, never loaded."""
    path = out_dir / f"{spec.name}.onnx"
    data = f"{spec.name}.onnx_data"
    try:
        if precision in BITS or not external_data:
            # Quantized, or with its weights inline (a small part).
            if precision not in BITS:
                proto = onnx.load(traced)
            elif not external_data:
                proto = quantize_file(traced, precision)
            else:  # each layer's packed weights go to the data file as they are made; the float tensors left after
                with open(out_dir / data, "wb") as data_file:
                    proto = quantize_file(traced, precision, partial(_append_tensor_data, data_file=data_file,
                                                                     location=data))
            onnx.save_model(proto, path, save_as_external_data=external_data, location=data,
                            size_threshold=EXTERNAL_TENSOR_MIN_BYTES, convert_attribute=True)
        else:
            (traced.parent / data).rename(out_dir / data)
            traced.rename(path)  # its tensors already name `data`
    finally:
        shutil.rmtree(traced.parent)
    return [path.name, *external_files(path)]


def _weights_to_initializers(proto: onnx.ModelProto, spec: PartSpec, params: dict[str, torch.Tensor],
                             weights: Callable[[str], torch.Tensor], folder: Path, location: str) -> None:
    """Turn the graph inputs that export_params=False made of the module's parameters into initializers,
    their data (`weights(name)`, in any float dtype, checked against the parameter's shape) converted to the
    parameter's dtype WRITE_ROWS rows at a time and written to folder/location page-aligned, so ONNX Runtime
    can map them."""
    inputs = [value for value in proto.graph.input if value.name not in spec.input_names]
    unknown = [value.name for value in inputs if value.name not in params]
    if unknown:
        raise RuntimeError(f"{spec.name}: the traced graph takes inputs {unknown[:4]} that are neither the part's "
                           f"inputs nor parameters of its module")
    with open(folder / location, "wb") as data:
        for value in inputs:
            tensor = weights(value.name)
            param = params[value.name]
            if tensor.shape != param.shape:
                raise RuntimeError(f"{spec.name}: weight {value.name} is {list(tensor.shape)}, the traced module's "
                                   f"parameter {list(param.shape)}")
            offset = _pad_to_page(data)
            length = sum(data.write(_raw_bytes(rows.to(param.dtype))) for rows in tensor.detach().split(WRITE_ROWS))
            del tensor
            initializer = onnx.TensorProto(name=value.name, dims=list(param.shape),
                                           data_type=ONNX_TYPES[param.dtype])
            _point_at(initializer, location, offset, length)
            proto.graph.initializer.append(initializer)
    kept = [value for value in proto.graph.input if value.name in spec.input_names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def _append_tensor_data(proto: onnx.ModelProto, data_file, location: str) -> None:
    """Move the data of every initializer that holds it in the proto (what the quantizer just made) to the end
    of data_file, page-aligned, the tensor then pointing at it."""
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
            offset = _pad_to_page(data_file)
            length = data_file.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            _point_at(tensor, location, offset, length)


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().cpu().numpy().reshape(-1).view(np.uint8)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """onnx's set_external_data, for a tensor whose data was never in the proto (it requires raw_data)."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _pad_to_page(f, page: int = 4096) -> int:
    offset = f.tell()
    padding = -offset % page
    f.write(b"\0" * padding)
    return offset + padding


def external_files(onnx_path: Path) -> list[str]:
    """Names of the external data files an ONNX file refers to."""
    proto = onnx.load(onnx_path, load_external_data=False)
    return sorted({ExternalDataInfo(t).location for t in _tensors(proto) if uses_external_data(t)})


def _tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node tensors (the graphs here have no subgraphs)."""
    constants = [a.t for node in proto.graph.node if node.op_type == "Constant" for a in node.attribute if a.HasField("t")]
    return [*proto.graph.initializer, *constants]


def _trace_to_onnx(graph: nn.Module, spec: PartSpec, path: Path) -> None:
    example = tuple(torch.zeros(t.concrete_shape(EXPORT_DIMS), dtype=TORCH_DTYPES[t.dtype]) for t in spec.inputs)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter's notices about its own deprecation (the choice is explained above).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, example, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
                          # Folding needs the weights' values, which export_params=False leaves out of the
                          # file: ONNX Runtime and TensorRT fold constants themselves when they load a graph.
                          export_params=False, do_constant_folding=False)
