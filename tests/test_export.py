"""The exported engines: ONNX Runtime vs PyTorch on fresh shapes, the denoiser's full vs cached pass, the manifest."""

import json
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, shape_inference
from safetensors.numpy import load_file

import llada_v
from exporter import build_engines, load_manifest
from exporter.onnx_export import EXPORT_DIMS, finish_part, part_specs, trace_part
from exporter.validate import REL_TOL, open_session, sample_inputs
from exporter.wrappers import wrap

PARTS = ["vision", "projector", "denoiser"]
# Sizes unlike both the export shape (onnx_export.EXPORT_DIMS) and the build's validation shapes.
FRESH_DIMS = {
    "vision": [{"num_tiles": 4}],
    "projector": [{"num_tiles": 5}],
    "denoiser": [{"batch": 3, "sequence": 11, "positions": 4, "past_sequence": 0},
                 {"batch": 1, "sequence": 2, "positions": 2, "past_sequence": 0},
                 {"batch": 3, "sequence": 6, "positions": 2, "past_sequence": 13},
                 {"batch": 1, "sequence": 3, "positions": 1, "past_sequence": 1}],
}


@pytest.fixture(scope="session")
def reference(shipped_model):
    """The float32 PyTorch model the engines are compared with (tests/conftest.py)."""
    return shipped_model


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """Both precisions built once. The fp16 build forces external data for every part, so it also
    covers `<part>.onnx_data`."""
    root = tmp_path_factory.mktemp("engines")
    return {"fp32": build_engines(None, root / "fp32", "fp32", progress=False),
            "fp16": build_engines(None, root / "fp16", "fp16", progress=False, external_data_threshold=0)}


def _compare(got: np.ndarray, want: torch.Tensor, precision: str, what: str) -> None:
    want = want.numpy()
    assert got.shape == want.shape, what
    scale = np.abs(want).max()
    err = np.abs(got.astype(np.float32) - want).max()
    assert err <= REL_TOL[precision] * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("part", PARTS)
def test_onnx_runtime_matches_pytorch_on_fresh_shapes(engines, reference, precision, part):
    spec = part_specs(reference.config, precision)[part]
    session = open_session(engines[precision] / f"{part}.onnx")
    assert session.get_providers() == ["CPUExecutionProvider"]
    rng = np.random.default_rng(1234)
    for dims in FRESH_DIMS[part]:
        assert dims != {d: EXPORT_DIMS[d] for d in dims}
        inputs = sample_inputs(spec, dims, reference, rng)
        got = session.run(spec.output_names, inputs)
        names = spec.input_names[:4] if dims.get("past_sequence") == 0 else spec.input_names  # the module's full pass
        with torch.no_grad():
            want = wrap(part, reference)(*(_reference_input(inputs[name]) for name in names))
        for name, g, w in zip(spec.output_names, got, want if isinstance(want, tuple) else (want,)):
            _compare(g, w, precision, f"{part}.{name} at {dims}")


def _reference_input(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.float() if tensor.is_floating_point() else tensor


def _full_pass_inputs(reference, precision, batch=2, length=12):
    """Left-padded sequences of real token embeddings, logits asked at every position, an empty cache."""
    dtype = np.float16 if precision == "fp16" else np.float32
    lm = reference.config.language
    embed = reference.denoiser.embed_tokens.weight.detach().numpy()
    rng = np.random.default_rng(7)
    mask = np.ones((batch, length), dtype=np.int64)
    mask[1, :3] = 0
    empty = np.zeros((batch, lm.num_attention_heads, 0, lm.head_dim), dtype=dtype)
    return {"inputs_embeds": embed[rng.integers(0, len(embed), (batch, length))].astype(dtype),
            "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0),
            "attention_mask": mask,
            "logits_index": np.tile(np.arange(length), (batch, 1)),
            **{f"past_{kind}.{i}": empty for kind in ("keys", "values") for i in range(lm.num_hidden_layers)},
            "past_mask": np.zeros((batch, 0), dtype=np.int64)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cached_pass_reproduces_the_full_pass_from_its_own_cache(engines, reference, precision):
    denoiser = open_session(engines[precision] / "denoiser.onnx")
    x = _full_pass_inputs(reference, precision)
    n_layers = reference.config.language.num_hidden_layers
    logits, *presents = denoiser.run(None, x)
    assert [o.name for o in denoiser.get_outputs()] == ["logits", *(f"present_keys.{i}" for i in range(n_layers)),
                                                    *(f"present_values.{i}" for i in range(n_layers))]
    keys, values = presents[:n_layers], presents[n_layers:]
    length = x["attention_mask"].shape[1]
    tol = REL_TOL[precision] * np.abs(logits).max()

    def queries(start, stop):
        q = {name: x[name][:, start:stop] for name in ("inputs_embeds", "position_ids", "attention_mask")}
        return {**q, "logits_index": np.tile(np.arange(stop - start), (len(logits), 1))}

    def past(cache_slots):
        return {**{f"past_keys.{i}": k[..., cache_slots, :] for i, k in enumerate(keys)},
                **{f"past_values.{i}": v[..., cache_slots, :] for i, v in enumerate(values)}}

    # prefix cache: the last 5 positions attend to the first length-5 positions' cached K/V
    prefix = length - 5
    got, *new_presents = denoiser.run(None, {**queries(prefix, length), **past(slice(0, prefix)),
                                           "past_mask": x["attention_mask"][:, :prefix]})
    assert np.abs(got - logits[:, prefix:]).max() <= tol
    for new, old in zip(new_presents, presents, strict=True):  # every layer's keys and values
        old = old.astype(np.float32)
        assert np.abs(new.astype(np.float32) - old[..., prefix:, :]).max() <= REL_TOL[precision] * np.abs(old).max()

    # dual cache: a middle block against the whole cache, its own slots hidden
    start, stop = 4, 8
    past_mask = x["attention_mask"].copy()
    past_mask[:, start:stop] = 0
    got, *_ = denoiser.run(None, {**queries(start, stop), **past(slice(None)), "past_mask": past_mask})
    assert np.abs(got - logits[:, start:stop]).max() <= tol


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_manifest_describes_the_folder(engines, reference, precision):
    folder = engines[precision]
    manifest = load_manifest(folder)
    cfg = reference.config
    assert manifest["format_version"] == 4 and manifest["precision"] == precision
    assert manifest["limits"] == {"max_batch": 8, "max_sequence": cfg.language.max_position_embeddings,
                                  "max_block": 256, "max_gen_length": 1024}
    assert manifest["source"]["checkpoint"] == str(llada_v.SHIPPED_MODEL_DIR)
    assert len(manifest["source"]["sha256"]) == 64
    assert list(manifest["parts"]) == PARTS
    for name, part in manifest["parts"].items():
        assert all((folder / f).is_file() for f in part["files"])
        session = open_session(folder / part["onnx"])
        for entries, actual in ((part["inputs"], session.get_inputs()), (part["outputs"], session.get_outputs())):
            assert [(e["name"], e["shape"]) for e in entries] == [(a.name, a.shape) for a in actual]
        for dims in part["profiles"].values():
            assert set(dims) == {d for e in part["inputs"] for d in e["shape"] if isinstance(d, str)}
        check = manifest["validation"][name]
        assert check["passed"] is True and check["max_abs_err"] <= check["atol"]
        assert len(check["shapes_checked"]) >= 2
    dtype = "float16" if precision == "fp16" else "float32"
    io = {e["name"]: e["dtype"] for p in manifest["parts"].values() for e in p["inputs"] + p["outputs"]}
    assert io["pixel_values"] == "float32" and io["logits"] == "float32"
    assert io["inputs_embeds"] == io["features"] == dtype
    lm = cfg.language

    def per_layer(name, length):
        return [{"name": f"{name}.{i}", "dtype": dtype, "shape": ["batch", lm.num_attention_heads, length, lm.head_dim]}
                for i in range(lm.num_hidden_layers)]

    assert manifest["parts"]["denoiser"]["inputs"][4:] == [
        *per_layer("past_keys", "past_sequence"), *per_layer("past_values", "past_sequence"),
        {"name": "past_mask", "dtype": "int64", "shape": ["batch", "past_sequence"]}]
    assert manifest["parts"]["denoiser"]["outputs"][1:] == [*per_layer("present_keys", "sequence"),
                                                          *per_layer("present_values", "sequence")]
    profiles = manifest["parts"]["denoiser"]["profiles"]
    assert list(profiles) == ["full", "cached"]
    assert profiles["full"]["past_sequence"] == {"min": 0, "opt": 0, "max": 0}
    assert profiles["cached"]["past_sequence"]["min"] == 1
    assert profiles["full"]["positions"]["max"] == profiles["cached"]["positions"]["max"] == 256  # the block

    embeddings = load_file(folder / manifest["embeddings"])
    assert embeddings["embed_tokens"].shape == (cfg.language.vocab_size, cfg.language.hidden_size)
    assert embeddings["image_newline"].shape == (cfg.language.hidden_size,)
    assert embeddings["embed_tokens"].dtype == embeddings["image_newline"].dtype == np.dtype(dtype)
    assert llada_v.LladaVConfig.from_file(folder / "config.json") == cfg
    assert llada_v.load_tokenizer(folder).get_vocab() == llada_v.load_tokenizer(llada_v.SHIPPED_MODEL_DIR).get_vocab()


def test_fp16_graphs_keep_norms_softmax_and_rope_in_float32(engines):
    folder = engines["fp16"]
    for part, fp32_ops in (("denoiser", {"ReduceMean", "Softmax", "Cos", "Sin"}),
                           ("vision", {"LayerNormalization", "Softmax"})):
        model = shape_inference.infer_shapes(onnx.load(folder / f"{part}.onnx"))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        input_types = {}
        for node in model.graph.node:
            input_types.setdefault(node.op_type, set()).add(types.get(node.input[0]) if node.input else None)
        for op in fp32_ops:
            assert input_types[op] == {TensorProto.FLOAT}, f"{part}: {op} must run in float32"
        assert input_types["MatMul"] == {TensorProto.FLOAT16}, f"{part}: the matmuls are fp16"


def test_fp16_engines_on_the_cpu_provider_say_what_the_cpu_does(engines):
    from runtime import Pipeline
    from runtime.backends.onnx_runtime import OnnxRuntimeRunner

    with pytest.warns(UserWarning, match="keeps an fp32 copy of the weights"):
        OnnxRuntimeRunner(engines["fp16"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline.load(engines["fp32"]).close()


def test_parts_over_the_threshold_keep_their_weights_in_external_data(engines):
    folder = engines["fp16"]
    parts = load_manifest(folder)["parts"]
    for name in PARTS:
        assert parts[name]["files"] == [f"{name}.onnx", f"{name}.onnx_data"]
    assert (folder / "denoiser.onnx").stat().st_size < (folder / "denoiser.onnx_data").stat().st_size / 10


def test_fp32_build_keeps_small_parts_in_one_file(engines):
    assert not list(engines["fp32"].glob("*.onnx_data"))
    assert json.loads((engines["fp32"] / "manifest.json").read_text())["parts"]["denoiser"]["files"] == [
        "denoiser.onnx"]


def test_text_only_checkpoint_gives_only_the_denoiser_parts(reference, tmp_path):
    """A plain LLaDA folder (like the real LLaDA-8B reference config) has no vision parts."""
    model = llada_v.LladaV(llada_v.LladaVConfig(language=reference.config.language, vision=None))
    model.denoiser.load_state_dict(reference.denoiser.state_dict())
    llada_v.save_model(model, tmp_path / "llada", tokenizer_folder=llada_v.SHIPPED_MODEL_DIR)
    out = build_engines(tmp_path / "llada", tmp_path / "engines", "fp32", progress=False)
    manifest = load_manifest(out)
    assert list(manifest["parts"]) == list(manifest["validation"]) == ["denoiser"]
    assert all(check["passed"] for check in manifest["validation"].values())
    assert list(load_file(out / "embeddings.safetensors")) == ["embed_tokens"]
    assert not list(out.glob("vision*")) and not list(out.glob("projector*"))


@pytest.mark.parametrize("external", [True, False])
def test_traced_parts_carry_their_weights_in_one_data_file(reference, tmp_path, external):
    """trace_part writes the weights from the module itself, page-aligned, beside a graph that holds none;
    finish_part moves them into place (external data) or inlines them, and the part computes the module's
    outputs."""
    spec = part_specs(reference.config, "fp32")["projector"]
    inputs = sample_inputs(spec, {"num_tiles": 2}, reference, np.random.default_rng(0))
    with torch.no_grad():
        want = wrap("projector", reference)(torch.from_numpy(inputs["features"])).numpy()
    traced = trace_part(wrap("projector", reference), spec, tmp_path)
    data = traced.parent / "projector.onnx_data"
    assert traced.stat().st_size < data.stat().st_size / 10
    proto = onnx.load(traced, load_external_data=False)
    offsets = [int(e.value) for t in proto.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(proto.graph.initializer) and all(offset % 4096 == 0 for offset in offsets)
    assert [i.name for i in proto.graph.input] == spec.input_names
    files = finish_part(traced, spec, tmp_path, external, precision="fp32")
    assert files == (["projector.onnx", "projector.onnx_data"] if external else ["projector.onnx"])
    assert not traced.parent.exists()
    got = open_session(tmp_path / "projector.onnx").run(None, inputs)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=REL_TOL["fp32"] * np.abs(want).max())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_weightless_trace_with_checkpoint_weights_is_the_trace_of_the_loaded_model(tmp_path, precision, monkeypatch):
    """The build traces wrappers.weightless_model (uninitialised placeholders) and writes each weight from the
    checkpoint (bf16 here, converted a few rows at a time): the same graph and the same weight bytes as tracing
    the loaded model."""
    from functools import partial

    from exporter import onnx_export
    from exporter.build import _checkpoint_weight

    monkeypatch.setattr(onnx_export, "WRITE_ROWS", 3)  # chunks that split every weight, the last one short
    from exporter.onnx_export import PRECISIONS, TORCH_DTYPES
    from exporter.wrappers import transpose_linear_weights, weightless_model
    from llada_v.weights import CheckpointReader

    dtype = TORCH_DTYPES[PRECISIONS[precision]]
    reader = CheckpointReader(llada_v.SHIPPED_MODEL_DIR)
    loaded = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR, dtype=dtype)
    transpose_linear_weights(loaded)
    weightless = weightless_model(reader.cfg, dtype)
    placeholders = list(weightless.parameters())
    assert len({p.reshape(-1)[0].item() for p in placeholders}) == len(placeholders)
    (tmp_path / "plain").mkdir(), (tmp_path / "streamed").mkdir()
    for name, spec in part_specs(reader.cfg, precision).items():
        plain = onnx.load(trace_part(wrap(name, loaded), spec, tmp_path / "plain"))
        streamed = onnx.load(trace_part(wrap(name, weightless), spec, tmp_path / "streamed",
                                        partial(_checkpoint_weight, reader)))
        assert [(n.op_type, list(n.input)) for n in streamed.graph.node] == \
            [(n.op_type, list(n.input)) for n in plain.graph.node]
        assert [(t.name, t.raw_data) for t in streamed.graph.initializer] == \
            [(t.name, t.raw_data) for t in plain.graph.initializer]
        for folder in ("plain", "streamed"):
            shutil.rmtree(tmp_path / folder / f".{name}.export")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_the_build_never_holds_the_whole_model(precision, tmp_path, monkeypatch):
    """The build reads the checkpoint one tensor at a time (the trace, the embeddings) or one layer at a time
    (the reference, besides its embeddings and head): never all of it, as load_model does."""
    from llada_v.weights import CheckpointReader

    def whole_model(*args, **kwargs):
        pytest.fail("the build loaded the whole model")

    monkeypatch.setattr(llada_v, "load_model", whole_model)
    monkeypatch.setattr(llada_v.weights, "load_model", whole_model)
    read_sizes = []
    read = CheckpointReader.read

    def counted_read(self, wanted, dtype, device):
        state = read(self, wanted, dtype, device)
        read_sizes.append(sum(t.numel() for t in state.values()))
        return state

    monkeypatch.setattr(CheckpointReader, "read", counted_read)
    build_engines(None, tmp_path / "engines", precision, progress=False)
    with torch.device("meta"):
        total = sum(p.numel() for p in llada_v.LladaV(llada_v.weights.checkpoint_config(llada_v.SHIPPED_MODEL_DIR)).parameters())
    assert 0 < max(read_sizes) < total / 4


def test_every_weight_matmul_reads_its_initializer_directly(engines):
    """With the linear weights traced transposed (wrappers.transpose_linear_weights), no Transpose stands
    between a weight and its MatMul: ONNX Runtime can pre-pack it and the quantizer finds it."""
    for precision in ("fp32", "fp16"):
        graph = onnx.load(engines[precision] / "denoiser.onnx", load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        projections = [n for n in graph.node if n.op_type == "MatMul" and ("proj" in n.name or "lm_head" in n.name)]
        assert projections and all(n.input[1] in weights for n in projections)
        assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]


def test_one_onnx_runtime_session_holds_the_denoiser_weights(engines):
    """Both passes run in the one denoiser session (tests/test_runners.py checks the bindings), so the weights
    are in memory once."""
    from runtime.backends.onnx_runtime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(engines["fp32"]) as runner:
        assert sorted(runner.sessions) == ["denoiser", "projector", "vision"]
        initializers = onnx.load(engines["fp32"] / "denoiser.onnx").graph.initializer
        weights = {t.name for t in initializers if len(t.dims) == 2}
        assert {i.name for i in runner.sessions["denoiser"].get_inputs()}.isdisjoint(weights)
