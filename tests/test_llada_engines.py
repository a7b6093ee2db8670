"""Engines of a text-only LLaDA checkpoint (the released layout at tiny size): the denoiser and the token embeddings
only, every precision validated, the manifest and config.json saying what the model is, the runtime opening them."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

import released_llada_layout
from exporter import build_engines, load_manifest
from llada_v import LladaVConfig
from llada_v.config import LLADA, LLADA_V
from llada_v.weights import checkpoint_config
from runtime import GenerationConfig, Pipeline
from runtime.backends.engines import open_engines

PRECISIONS = ["fp32", "fp16", "int8", "int4"]


@pytest.fixture(scope="module")
def engines(released_llada, tmp_path_factory):
    root = tmp_path_factory.mktemp("llada-engines")
    return {p: build_engines(released_llada, root / p, p, progress=False) for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_gives_a_validated_denoiser_and_embeddings_only(engines, released_llada, precision):
    folder = engines[precision]
    manifest = load_manifest(folder)
    assert manifest["family"] == LLADA and manifest["precision"] == precision
    assert list(manifest["parts"]) == list(manifest["validation"]) == ["denoiser"]
    assert manifest["validation"]["denoiser"]["passed"]
    assert sorted(p.name for p in folder.glob("*.onnx*")) == ["denoiser.onnx"]
    with safe_open(folder / manifest["embeddings"], "pt") as f:
        assert list(f.keys()) == ["embed_tokens"]
        assert f.get_slice("embed_tokens").get_shape() == [released_llada_layout.VOCAB_ROWS, 64]  # every row
    opened = open_engines(folder)
    assert opened.config == checkpoint_config(released_llada) and opened.config.family == LLADA


def test_config_json_is_in_the_released_llada_layout(engines):
    raw = json.loads((engines["fp32"] / "config.json").read_text())
    assert raw["d_model"] == 64 and raw["block_type"] == "llama" and "hidden_size" not in raw
    assert LladaVConfig.from_dict(raw).family == LLADA


def test_llada_v_engines_say_their_family(engines_dir):
    assert load_manifest(engines_dir)["family"] == LLADA_V


def test_engines_answer_as_the_checkpoint_does(engines, released_llada):
    config = GenerationConfig(gen_length=8, block_length=8)
    from_engines = Pipeline.load(engines["fp32"], "onnxruntime").generate("What is 2 + 3?", config=config)
    from_checkpoint = Pipeline.load(released_llada, "torch").generate("What is 2 + 3?", config=config)
    assert from_engines.token_ids == from_checkpoint.token_ids and len(from_engines.token_ids) > 0


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("tensorrt")),
                    reason="building TensorRT engines needs a CUDA GPU and the tensorrt package")
def test_tensorrt_builds_the_denoiser_plan(released_llada, tmp_path):
    out = build_engines(released_llada, tmp_path / "engines", "fp16", backend="tensorrt", progress=False)
    parts = load_manifest(out)["parts"]
    assert list(parts) == ["denoiser"] and (out / parts["denoiser"]["plan"]).stat().st_size > 0
