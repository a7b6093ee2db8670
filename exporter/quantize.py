"""Weight-only int8 / int4 parts: ONNX Runtime's own MatMulNBits quantizer, and its inverse for validation.

`quantize` runs `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` on a float32
graph: every MatMul whose second input is a weight (projections, MLP, the vocabulary head; not the
attention products, whose operands are activations) becomes a `MatMulNBits` node with the weight in
blocks of BLOCK_SIZE along the input dimension, each block one fp32 scale; int8 symmetric (no zero
points), int4 asymmetric (a 4-bit zero point per block, 1/64 byte a weight). Norms, softmax, RoPE and the
token embedding are not MatMuls with weights, so they stay as they were (float32). `accuracy_level` 4 lets
the CPU kernel quantize each activation block to int8 and multiply in integers, several times faster than the
default level. int4 is asymmetric with blocks of 32: within a point of fp32's exact match, where symmetric
blocks of 32 lose more and blocks of 16 cost memory and speed; int8's symmetric blocks of 32 give the fp32
engines' answers (README, Measured choices, has the figures of every choice tried).

Validation (`dequantize_into`): the quantized weights, dequantized, are written into the float32
reference model, so the check compares the graph's arithmetic with the same weights: a graph whose
weights were packed or placed wrong fails it, while the quantization's own effect on answers is what
the benchmarks measure (held-out accuracy, token agreement). The tolerance (validate.REL_TOL) covers
accuracy level 4's int8 activations.

Unpacking MatMulNBits' blobs is written here because ONNX Runtime exposes no Python dequantizer for
them; the layout is the operator's (contrib op MatMulNBits): B uint8 [N, K / block, block * bits / 8],
for 4 bits two values per byte, the first in the low nibble; scales [N, K / block]; zero points
uint8 [N, K / block] packed like B (two per byte for 4 bits), or, without them, 2^(bits - 1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data
from torch import nn

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
SYMMETRIC = {"int8": True, "int4": False}
ACCURACY_LEVEL = 4
QUANTIZED_OP = "MatMulNBits"
DEQUANTIZE_ROWS = 4096  # output rows unpacked at a time: 4096 x 4096 float32 values (64 MB) at LLaDA-8B's width


class QuantizationError(RuntimeError):
    """A quantized graph does not map back onto the PyTorch model it was exported from."""


def quantize(proto: onnx.ModelProto, precision: str, exclude: Iterable[str] = ()) -> onnx.ModelProto:
    """The float32 graph with its weight MatMuls quantized to BITS[precision] bits, but for the nodes named in
    `exclude`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=SYMMETRIC[precision],
                                          accuracy_level=ACCURACY_LEVEL, bits=BITS[precision])
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config, nodes_to_exclude=list(exclude))
        quantizer.process()
    finally:
        quantizer_log.setLevel(level)
    return quantizer.model.model


def quantize_file(path: Path, precision: str,
                  after_group: Callable[[onnx.ModelProto], None] | None = None) -> onnx.ModelProto:
    """`quantize` of a traced graph whose weights are external data beside it (onnx_export.trace_part's), in
    memory one float weight at a time: the graph is loaded without its data and the quantizer reads each
    weight itself (through onnx_ir, which maps the file at a tensor's location); the float tensors left
    (norm weights, biases) are loaded into the proto afterwards.

    after_group: quantize one group of weight MatMuls at a time (a transformer layer's, or one outside the
    layers) and call this with the proto after each, e.g. to move the packed weights just made to a data file:
    ONNX Runtime's quantizer keeps every packed weight in the graph it returns (at 3.13B int4 that was the
    build's peak, 3.9 GB for 2.3 GB of engines). None: one pass over the whole graph."""
    proto = onnx.load(path, load_external_data=False)
    locations = {t.name: ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    for tensor in proto.graph.initializer:  # onnx_ir resolves a location against the current folder: make it absolute
        if tensor.name in locations:
            _set_location(tensor, str(path.parent / locations[tensor.name]))
    if after_group is None:
        proto = quantize(proto, precision)
    else:
        groups = _weight_matmul_groups(proto)
        every = {name for group in groups for name in group}
        for group in groups:
            proto = quantize(proto, precision, exclude=every - set(group))
            after_group(proto)
            # A copy: protobuf (upb) keeps a cleared field's bytes in the message's arena until the message is freed.
            proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for tensor in proto.graph.initializer:  # the trace's float tensors the quantizer left: into the proto
        if tensor.name in locations and uses_external_data(tensor):
            _set_location(tensor, locations[tensor.name])
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto


def _weight_matmul_groups(proto: onnx.ModelProto) -> list[list[str]]:
    """The names of the MatMul nodes whose second input is an initializer, grouped by transformer layer (the
    node scope's `.../layers.N/` part); a node outside the layers is a group of its own."""
    weights = {t.name for t in proto.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            layer = re.match(r"(.*?/layers\.\d+)/", node.name)
            groups.setdefault(layer[1] if layer else node.name, []).append(node.name)
    return list(groups.values())


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    (entry,) = (e for e in tensor.external_data if e.key == "location")
    entry.value = location


def dequantize_into(model: nn.Module, proto: onnx.ModelProto, base_dir: Path | None = None, prefix: str = "") -> int:
    """Write the MatMulNBits weights of `proto`, dequantized, into the nn.Linear layers of `model` they were
    exported from; returns how many. The exporter names a node after its module's scope, e.g.
    `/denoiser/layers.0/self_attn/q_proj/MatMul`, and the quantizer appends `_Q4` / `_Q8`.

    prefix: the module name of `model` inside the exported one (e.g. `denoiser.layers.0` or `denoiser.lm_head`,
    a module the streaming reference just read): only the nodes of it are written. Linear layers still on the meta
    device (streamed layers not read yet) are left alone. base_dir: where the external data of a proto
    loaded without it is; each weight is read from there when it is written, so memory holds one at a time.
    """
    initializers = {t.name: t for t in proto.graph.initializer}
    modules = dict(model.named_modules())
    count = 0
    for node in proto.graph.node:
        if node.op_type != QUANTIZED_OP:
            continue
        path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        if prefix:
            if path != prefix and not path.startswith(prefix + "."):
                continue
            path = path[len(prefix) + 1:]  # "" when the node is the module itself (a streamed head)
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"quantized node {node.name} names no linear layer of the model ({path!r})")
        if linear.weight.is_meta:
            continue
        with torch.no_grad():
            for start, rows in _dequantized_rows(node, tuple(linear.weight.shape), initializers, base_dir):
                linear.weight[start:start + len(rows)].copy_(torch.from_numpy(rows))
        count += 1
    return count


def _dequantized_rows(node: onnx.NodeProto, shape: tuple[int, int], initializers: dict[str, onnx.TensorProto],
                      base_dir: Path | None):
    """The float32 weight [N, K] of a MatMulNBits node, DEQUANTIZE_ROWS rows at a time as (first row,
    rows): unpacking a whole vocabulary head at once takes three float32 copies of it."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if (n, k) != shape:
        raise QuantizationError(f"quantized node {node.name} holds a {(n, k)} weight, its linear layer has {shape}")
    packed, scales = (_array(initializers[name], base_dir) for name in node.input[1:3])
    packed, scales = packed.reshape(n, -1), scales.astype(np.float32).reshape(n, -1)
    blocks = scales.shape[1]
    if len(node.input) > 3 and node.input[3]:  # [N, blocks] levels, packed like B
        zero_points = _array(initializers[node.input[3]], base_dir).reshape(n, -1)
        zero_points = _unpacked(zero_points, bits).reshape(n, -1)[:, :blocks]
    else:  # one level for every block, broadcast rather than stored
        zero_points = np.broadcast_to(np.uint8(1 << (bits - 1)), (n, blocks))
    for start in range(0, n, DEQUANTIZE_ROWS):
        block_packed, block_scales = packed[start:start + DEQUANTIZE_ROWS], scales[start:start + DEQUANTIZE_ROWS]
        rows = len(block_packed)
        levels = _unpacked(block_packed, bits).reshape(rows, -1, block).astype(np.float32)
        weight = levels - zero_points[start:start + rows, :, None]
        yield start, (weight * block_scales[:, :, None]).reshape(rows, -1)[:, :k]


def _unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> their levels: two per byte for 4 bits, the first in the low nibble."""
    return np.stack((packed & 0x0F, packed >> 4), axis=-1) if bits == 4 else packed


def _array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """A tensor's values, its external data read from base_dir into a copy (to_array would load it into the
    proto itself, which would then hold every weight read)."""
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return numpy_helper.to_array(copy, str(base_dir))
