"""int8 / int4 engines: ONNX Runtime's MatMulNBits on the weight matmuls only, validated against the reference
holding the graph's own weights, refused where they cannot run, answered by the runtime."""

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper, shape_inference
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

import llada_v
from benchmarks.demo_model.data import load_examples
from benchmarks.demo_model.evaluate import runtime_predictor
from exporter import build_engines, load_manifest
from exporter import quantize as quantize_module
from exporter.build import BuildError
from exporter.onnx_export import part_specs
from exporter.quantize import BITS, BLOCK_SIZE, QUANTIZED_OP, SYMMETRIC, dequantize_into, quantize, quantize_file
from exporter.validate import check_part, reference_cases
from exporter.onnx_export import _append_tensor_data, trace_part
from exporter.wrappers import transpose_linear_weights, wrap
from llada_v.weights import load_model_streaming

QUANTIZED = list(BITS)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """int4 keeps every part's weights in external data, so the quantized external-data path is covered too."""
    root = tmp_path_factory.mktemp("quantized")
    return {p: build_engines(None, root / p, p, progress=False, **({"external_data_threshold": 0} if p == "int4" else {}))
            for p in ["fp32", *QUANTIZED]}


@pytest.mark.parametrize("precision", QUANTIZED)
def test_weight_matmuls_are_quantized_and_the_rest_stays_float32(quantized, precision):
    manifest = load_manifest(quantized[precision])
    assert manifest["precision"] == precision
    assert all(check["passed"] for check in manifest["validation"].values())
    model = shape_inference.infer_shapes(onnx.load(quantized[precision] / "denoiser.onnx"))
    nodes = model.graph.node
    quantized_nodes = [n for n in nodes if n.op_type == QUANTIZED_OP]
    lm = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR).config.language
    assert len(quantized_nodes) == 7 * lm.num_hidden_layers + 1  # q, k, v, o, gate, up, down per layer; the head
    for node in quantized_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == BITS[precision] and attrs["block_size"] == BLOCK_SIZE
        assert (len(node.input) > 3 and bool(node.input[3])) == (not SYMMETRIC[precision])  # int4's zero points
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in nodes:  # the attention products (activations by activations) stay float matmuls
        if node.op_type in ("MatMul", "Softmax", "ReduceMean", "Cos", "Sin"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    scales = {n.input[2] for n in quantized_nodes}
    floats = [t for t in model.graph.initializer
              if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.name not in scales]
    assert not floats, f"float weight matrices left: {[t.name for t in floats][:4]}"


def test_quantized_folders_are_smaller(quantized):
    assert load_manifest(quantized["int4"])["parts"]["denoiser"]["files"] == ["denoiser.onnx", "denoiser.onnx_data"]
    def weight_bytes(folder):
        return sum(p.stat().st_size for p in folder.glob("*.onnx*"))

    fp32, int8, int4 = (weight_bytes(quantized[p]) for p in ("fp32", "int8", "int4"))
    assert int4 < int8 < 0.5 * fp32


@pytest.mark.parametrize("precision", QUANTIZED)
def test_dequantized_weights_are_the_quantizers_rounding_of_the_originals(precision, tmp_path):
    """dequantize_into reads the blobs back onto each block's grid: a step is the block's largest |weight| over
    2^(bits-1) when symmetric (the largest positive value clips to 2^(bits-1) - 1 levels), the block's range
    (with 0 in it) over 2^bits - 1 when asymmetric (the zero point is rounded too); rounding is off by a
    quarter step on average and never more than a step."""
    exported = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    transpose_linear_weights(exported)  # as the build traces it
    spec = part_specs(exported.config, precision)["projector"]
    proto = quantize(onnx.load(trace_part(wrap("projector", exported), spec, tmp_path)), precision)
    model = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    original = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    assert dequantize_into(model, proto) == 2
    for name, param in model.projector.named_parameters():
        if param.dim() != 2:
            continue
        blocks = original[name].reshape(param.shape[0], -1, BLOCK_SIZE)
        if SYMMETRIC[precision]:
            step = blocks.abs().amax(-1, keepdim=True) / (1 << (BITS[precision] - 1))
        else:
            step = (blocks.amax(-1, keepdim=True).clamp(min=0) - blocks.amin(-1, keepdim=True).clamp(max=0)) / (
                (1 << BITS[precision]) - 1)
        err = (param.detach().reshape(blocks.shape) - blocks).abs() / step
        assert err.max() <= 1 + 1e-4 and 0.2 < err.mean() < 0.3, name
        assert not torch.equal(param, original[name])


@pytest.mark.parametrize("precision", QUANTIZED)
def test_dequantizing_a_few_rows_at_a_time_writes_what_one_block_does(precision, tmp_path, monkeypatch):
    exported = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    transpose_linear_weights(exported)
    spec = part_specs(exported.config, precision)["denoiser"]
    proto = quantize(onnx.load(trace_part(wrap("denoiser", exported), spec, tmp_path)), precision)
    whole, chunked = (llada_v.load_model(llada_v.SHIPPED_MODEL_DIR) for _ in range(2))
    dequantize_into(whole, proto)
    monkeypatch.setattr(quantize_module, "DEQUANTIZE_ROWS", 5)  # every weight in several blocks, the last short
    dequantize_into(chunked, proto)
    for (name, want), got in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        assert torch.equal(got, want), name
    assert not torch.equal(whole.denoiser.lm_head.weight, exported.denoiser.lm_head.weight_t.t())


@pytest.mark.parametrize("precision", QUANTIZED)
def test_streamed_quantization_is_the_quantizer_on_the_loaded_graph(precision, tmp_path):
    """quantize_file (weights read by the quantizer one at a time from the trace's data file) gives the graph
    and the weights that quantize gives on the graph loaded with all its weights; so does it one layer at a
    time, each layer's packed weights moved to a data file before the next (what the build does)."""
    exported = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    transpose_linear_weights(exported)
    spec = part_specs(exported.config, precision)["denoiser"]
    traced = trace_part(wrap("denoiser", exported), spec, tmp_path)
    plain = quantize(onnx.load(traced), precision)
    streamed = quantize_file(traced, precision)
    moved = []

    def move(proto):
        moved.append({t.name for t in proto.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= 1024})
        _append_tensor_data(proto, data_file, "by_layer.onnx_data")

    with open(tmp_path / "by_layer.onnx_data", "wb") as data_file:
        by_layer = quantize_file(traced, precision, move)
    # Each layer's seven packed weights, scales and (int4) zero points, then the head's; tensors under 1 KB stay inline.
    packed = {t.name for t in plain.graph.initializer if len(t.raw_data) >= 1024
              and t.name.endswith(("_scales", "_zero_points", f"_Q{BITS[precision]}"))}
    layers = exported.config.language.num_hidden_layers
    modules = [{re.match(r"denoiser\.(layers\.\d+|lm_head)\.", name)[1] for name in group} for group in moved]
    assert modules == [{f"layers.{i}"} for i in range(layers)] + [{"lm_head"}]
    assert set().union(*moved) == packed and sum(map(len, moved)) == len(packed)
    assert all(uses_external_data(t) == (t.name in packed) for t in by_layer.graph.initializer)
    load_external_data_for_model(by_layer, str(tmp_path))
    for graph in (streamed, by_layer):
        assert [(n.op_type, list(n.input)) for n in graph.graph.node] == \
            [(n.op_type, list(n.input)) for n in plain.graph.node]
        assert not any(uses_external_data(t) for t in graph.graph.initializer)
        assert {t.name: numpy_helper.to_array(t).tobytes() for t in graph.graph.initializer} == \
            {t.name: numpy_helper.to_array(t).tobytes() for t in plain.graph.initializer}


def test_streaming_reference_takes_the_dequantized_weights_layer_by_layer(quantized):
    """The build's int8/int4 reference: each layer and the head read from the checkpoint, then given the graph's weights
    (read from the external data one at a time), computes what a loaded model holding them all computes."""
    folder = quantized["int4"]
    proto = onnx.load(folder / "denoiser.onnx", load_external_data=False)
    loaded = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    assert dequantize_into(loaded, onnx.load(folder / "denoiser.onnx")) == 7 * loaded.config.language.num_hidden_layers + 1
    written = []

    def dequantize(prefix, module):
        written.append((prefix, dequantize_into(module, proto, folder, prefix)))

    streamed = load_model_streaming(llada_v.SHIPPED_MODEL_DIR, on_load=dequantize)
    assert written == [("", 0)]  # the layers and the head are not read yet
    spec = part_specs(loaded.config, "int4")["denoiser"]
    want, got = reference_cases(spec, loaded), reference_cases(spec, streamed)
    for expected, actual in zip(want, got):
        for a, b in zip(actual.expected, expected.expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert ("denoiser.layers.0", 7) in written and ("denoiser.lm_head", 1) in written


def test_validation_fails_on_a_weight_put_in_the_wrong_place(quantized, tmp_path):
    """Two layers' quantized q_proj weights swapped: the graph runs, and validation catches it."""
    path = quantized["int8"] / "denoiser.onnx"
    proto = onnx.load(path)
    by_name = {t.name: t for t in proto.graph.initializer}
    q_proj = [n for n in proto.graph.node if n.op_type == QUANTIZED_OP and "q_proj" in n.name]
    first, second = (by_name[n.input[1]] for n in q_proj[:2])
    a, b = numpy_helper.to_array(first), numpy_helper.to_array(second)
    first.CopyFrom(numpy_helper.from_array(b, first.name))
    second.CopyFrom(numpy_helper.from_array(a, second.name))
    onnx.save(proto, tmp_path / "denoiser.onnx")
    reference = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    dequantize_into(reference, onnx.load(path))  # the weights the build quantized, in their right places
    spec = part_specs(reference.config, "int8")["denoiser"]
    cases = reference_cases(spec, reference)
    assert check_part(path, spec, cases, "int8").passed
    result = check_part(tmp_path / "denoiser.onnx", spec, cases, "int8")
    assert not result.passed and "failed validation" in result.summary()


def test_quantized_engines_cannot_go_to_tensorrt(tmp_path):
    with pytest.raises(BuildError, match="MatMulNBits.*TensorRT.*--backend onnx"):
        build_engines(None, tmp_path / "engines", "int4", backend="tensorrt", progress=False)
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantized_engines_answer_held_out_questions(quantized, precision):
    """Colour and count questions are answered perfectly at every precision (benchmarks measure the rest)."""
    examples = [e for e in load_examples(limit=40) if e.kind in ("colour", "count")][:6]
    predict = runtime_predictor(quantized[precision], backend="onnxruntime")
    assert predict(examples) == [e.answer for e in examples]


def test_quantized_engines_keep_the_embedding_table_in_fp16(quantized):
    from safetensors.numpy import load_file

    from runtime.backends.onnx_runtime import OnnxRuntimeRunner

    stored = load_file(quantized["int4"] / "embeddings.safetensors")
    assert stored["embed_tokens"].dtype == np.float16 and stored["image_newline"].dtype == np.float32
    with OnnxRuntimeRunner(quantized["int4"]) as runner:
        rows = runner.embed(torch.tensor([[3, 7]]))
    assert rows.dtype == torch.float32
    assert torch.equal(rows[0], torch.from_numpy(stored["embed_tokens"][[3, 7]]).float())
