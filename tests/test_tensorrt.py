"""The TensorRT paths on a CPU: the engines' limits and profiles, the build's memory check, each plan validated
like its ONNX part, plan execution (alignment, return values, streams) and the TensorRT runner's tokens, through
tests/fake_tensorrt.py; the ONNX Runtime runner's CUDA stream. A real GPU runs the real thing in
benchmarks.gpu_check and the GPU-only tests."""

import importlib.util
import sys

import pytest
import torch

import fake_tensorrt
from exporter import build_engines, load_manifest, trt_build
from exporter.build import BuildError, ValidationError
from exporter.engines_format import EngineLimits
from exporter.onnx_export import part_specs
from exporter.profiles import activation_bytes, default_limits, engine_bytes, part_profiles
from exporter.trt_plan import PlanError, PlanExecutor, aligned, is_aligned
from llada_v import LladaVConfig
from runtime import GenerationConfig, Pipeline
from runtime.generation.cache import layer_aligned

GB = 1e9
LIMITS = dict(max_batch=2, max_block=16, max_gen_length=32)  # small, so chunking and clipping are exercised


@pytest.fixture(scope="module")
def fake_trt():
    """The fake tensorrt package, fake CUDA streams, and the build's GPU checks answered for an 80 GB GPU."""
    with pytest.MonkeyPatch.context() as patch:
        fake = fake_tensorrt.FakeTensorRT()
        patch.setitem(sys.modules, "tensorrt", fake)
        fake_tensorrt.install_fake_cuda(patch, fake.log)
        patch.setattr(trt_build, "unavailable_reason", lambda: None)
        patch.setattr(trt_build, "gpu_memory_bytes", lambda: 80 * GB)
        patch.setattr(trt_build, "plan_device", lambda: torch.device("cpu"))
        yield fake


@pytest.fixture(scope="module")
def trt_engines(fake_trt, tmp_path_factory):
    return build_engines(None, tmp_path_factory.mktemp("trt") / "fp32", "fp32", backend="tensorrt", progress=False,
                         **LIMITS)


# ---- limits and profiles ------------------------------------------------------------------------------------

def test_default_limits_of_the_real_llada_8b_fit_an_80_gb_gpu(reference_dir):
    cfg = LladaVConfig.from_file(reference_dir / "config.json")
    for precision in ("fp16", "fp32", "int8", "int4"):
        limits = default_limits(cfg, precision)
        assert limits.max_sequence == 8192 and engine_bytes(cfg, precision, limits) <= 80 * GB, precision
    assert default_limits(cfg, "fp16").max_batch == 2
    # The logits are computed at the block only: their largest output is the block's rows, not the sequence's.
    limits = default_limits(cfg, "fp16")
    for profile in part_profiles(cfg, limits)["denoiser"].values():
        assert profile["positions"].max == limits.max_block == 256 < limits.max_sequence
    # One profile with every axis at the position table's 16,384 and batch 4 (as before) cannot run anywhere.
    spec = part_specs(cfg, "fp16")["denoiser"]
    old = {"batch": 4, "sequence": 16384, "positions": 16384, "past_sequence": 16384}
    assert activation_bytes(spec, old, cfg, "fp16") > 300 * GB


def test_limits_that_contradict_each_other_are_refused(tmp_path):
    with pytest.raises(BuildError, match="max_block 64 must not exceed max_gen_length 32"):
        build_engines(None, tmp_path / "e", "fp32", progress=False, max_block=64, max_gen_length=32)
    with pytest.raises(BuildError, match="--max-sequence 4096 exceeds the model's 2048 positions"):
        build_engines(None, tmp_path / "e", "fp32", progress=False, max_sequence=4096)
    with pytest.raises(BuildError, match="--max-batch must be a positive integer"):
        build_engines(None, tmp_path / "e", "fp32", progress=False, max_batch=0)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        EngineLimits(0, 16, 8, 8)
    assert not (tmp_path / "e").exists()


def test_a_tensorrt_build_too_large_for_the_gpu_is_refused_naming_the_flags(fake_trt, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trt_build, "gpu_memory_bytes", lambda: 10e6)
    with pytest.raises(BuildError, match=r"more than this GPU's 0.0 GB: lower --max-batch \(now 8\) or "
                                         r"--max-sequence \(now 2048\)"):
        build_engines(None, tmp_path / "e", "fp16", backend="tensorrt")
    assert "at the largest shapes the denoiser full pass needs" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_tensorrt_profiles_flags_and_plans(fake_trt, trt_engines):
    manifest = load_manifest(trt_engines)
    assert manifest["limits"] == {"max_batch": 2, "max_sequence": 2048, "max_block": 16, "max_gen_length": 32}
    built = fake_trt.built["denoiser.onnx"]
    assert built["strongly_typed"] and built["tf32"] is False  # fp32 engines compute in fp32
    full, cached = built["profiles"]
    hidden = full["inputs_embeds"][2][2]
    assert full["inputs_embeds"] == [[1, 1, hidden], [1, 1024, hidden], [2, 2048, hidden]]
    assert full["past_keys.0"][2][:3] == [2, 4, 0] and full["past_mask"] == [[1, 0], [1, 0], [2, 0]]
    assert cached["inputs_embeds"][2] == [2, 32, hidden] and cached["past_mask"][2] == [2, 2048]
    assert full["logits_index"][2] == cached["logits_index"][2] == [2, 16]  # the block, not the sequence
    assert fake_trt.built["vision.onnx"]["profiles"][0]["pixel_values"][2][0] == \
        manifest["parts"]["vision"]["profiles"]["all"]["num_tiles"]["max"]
    for name, part in manifest["parts"].items():
        assert part["plan"] == f"{name}.plan" and (trt_engines / part["plan"]).is_file()


def test_fp16_tensorrt_engines_keep_tf32_as_tensorrt_sets_it(fake_trt, monkeypatch, tmp_path):
    monkeypatch.setattr(fake_trt, "built", {})
    build_engines(None, tmp_path / "fp16", "fp16", backend="tensorrt", progress=False, **LIMITS)
    assert fake_trt.built["denoiser.onnx"]["tf32"] is True


def test_every_plan_is_validated_against_pytorch(trt_engines):
    validation = load_manifest(trt_engines)["validation"]
    for name, onnx_check in validation.items():
        check = onnx_check["tensorrt"]
        assert check["passed"] and check["checks"] and check["shapes_checked"] == onnx_check["shapes_checked"]
        assert all(shape.get("batch", 1) <= LIMITS["max_batch"] for shape in check["shapes_checked"])


def test_a_plan_that_computes_wrong_fails_the_build(fake_trt, monkeypatch, tmp_path):
    monkeypatch.setattr(fake_trt, "corrupt_outputs", True)
    with pytest.raises(ValidationError, match="TensorRT engine .* failed validation against PyTorch"):
        build_engines(None, tmp_path / "bad", "fp32", backend="tensorrt", progress=False, **LIMITS)
    assert not (tmp_path / "bad").exists()


# ---- running plans ------------------------------------------------------------------------------------------

def _plan(engines, part="projector"):
    profiles = list(load_manifest(engines)["parts"][part]["profiles"])
    return PlanExecutor(engines / f"{part}.plan", torch.device("cpu"), profiles)


def test_misaligned_inputs_and_outputs_run_from_aligned_copies(fake_trt, trt_engines, shipped_model):
    plan = _plan(trt_engines)
    vis = shipped_model.config.vision
    shape = (2, vis.tokens_per_tile, vis.hidden_size)
    misaligned_input = torch.randn(2 * vis.tokens_per_tile * vis.hidden_size + 1)[1:].view(shape)
    assert not is_aligned(misaligned_input)  # the fake refuses such an address; it must be copied
    want = shipped_model.projector(misaligned_input).detach()
    out = torch.empty(want.numel() + 1)[1:].view(want.shape)
    assert not is_aligned(out)
    result = plan.run("all", {"features": misaligned_input}, {"embeddings": out})
    assert result["embeddings"] is out
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_plan_execution_checks_every_answer(fake_trt, trt_engines, monkeypatch):
    plan = _plan(trt_engines, "denoiser")
    hidden = load_manifest(trt_engines)["parts"]["denoiser"]["inputs"][0]["shape"][2]
    too_many = {"inputs_embeds": torch.zeros(3, 4, hidden)}
    with pytest.raises(PlanError, match=r"inputs_embeds of shape \[3, 4, .*\] is outside the 'full' optimization"):
        plan.run("full", too_many)
    monkeypatch.setattr(fake_tensorrt._Context, "set_tensor_address", lambda self, name, address: False)
    with pytest.raises(PlanError, match="TensorRT refused the address of"):
        _plan(trt_engines).run("all", {"features": torch.zeros(1, 4, 128)})
    monkeypatch.setattr(fake_tensorrt._Engine, "create_execution_context", lambda self, strategy: None)
    with pytest.raises(PlanError, match="could not create an execution context for projector.plan"):
        _plan(trt_engines)


def test_plans_run_on_their_own_stream_between_waits(fake_trt, trt_engines):
    plan = _plan(trt_engines)
    fake_trt.log.clear()
    plan.run("all", {"features": torch.zeros(1, 4, 128)})
    assert fake_trt.log == [("wait", plan.stream.cuda_stream, 0), ("execute", plan.stream.cuda_stream),
                            ("wait", 0, plan.stream.cuda_stream)]
    assert plan.stream.cuda_stream != 0  # never torch's legacy default stream


def test_alignment_helpers():
    t = torch.arange(10.0)[3:]
    copy = aligned(t)
    assert is_aligned(copy) and torch.equal(copy, t)
    for shape, dtype in (((3, 2, 3, 5, 16), torch.float32), ((2, 1, 1, 3, 16), torch.float16)):
        cache = layer_aligned(shape, dtype, torch.device("cpu"))
        assert cache.shape == shape and not cache.any()
        assert all(layer.is_contiguous() and is_aligned(layer) for layer in cache)


# ---- the runtime on TensorRT engines ------------------------------------------------------------------------

def test_tensorrt_runner_gives_onnx_runtime_tokens_in_engine_sized_calls(fake_trt, trt_engines, monkeypatch):
    import runtime.backends.tensorrt

    monkeypatch.setattr(runtime.backends.tensorrt, "resolve_device", lambda device, backend: torch.device("cpu"))
    trt = Pipeline.load(trt_engines, backend="tensorrt", device="cuda")
    ort = Pipeline.load(trt_engines, backend="onnxruntime")
    assert trt.runner.limits.max_batch == 2
    questions = ["What colour is the circle?", "How many shapes are there?", "What shape is red?"]
    for cache in ("none", "dual", "prefix"):
        config = GenerationConfig(gen_length=16, block_length=8, cache=cache, refresh_interval=2)
        fake_trt.log.clear()
        batch = trt.generate(questions, config=config)
        assert [r.token_ids for r in batch] == [ort.generate(q, config=config).token_ids for q in questions]
        executed = fake_trt.log.count(("execute", trt.runner.plans["denoiser"].stream.cuda_stream))
        if cache != "none":  # a cached pass over the three rows runs as calls of two rows and one
            assert executed > batch[0].stats["nfe"]


def test_onnx_runtime_on_cuda_runs_on_a_stream_of_its_own(engines_dir, monkeypatch):
    """torch's default stream has handle 0, which ONNX Runtime reads as "no user stream"."""
    from runtime.backends.onnx_runtime import OnnxRuntimeRunner

    log = []
    caller = fake_tensorrt.install_fake_cuda(monkeypatch, log)
    runner = OnnxRuntimeRunner(engines_dir)
    options = runner._provider_options("CUDAExecutionProvider")
    assert options["has_user_compute_stream"] == "1"
    assert options["user_compute_stream"] == str(runner.stream.cuda_stream) != str(caller.cuda_stream)

    class Session:
        def io_binding(self):
            return type("Binding", (), {"bind_input": lambda *a: None, "bind_output": lambda *a: None})()

        def run_with_iobinding(self, binding):
            log.append(("run",))

    runner.sessions = {"denoiser": Session()}
    runner._run("denoiser", {}, {})
    assert log == [("wait", runner.stream.cuda_stream, 0), ("run",), ("wait", 0, runner.stream.cuda_stream)]


def test_both_onnx_runtime_flavours_installed_are_refused(engines_dir, monkeypatch):
    import importlib.metadata

    versions = {"onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    with pytest.raises(ValueError, match="both onnxruntime 1.22.0 and onnxruntime-gpu 1.22.0 are installed"):
        Pipeline.load(engines_dir)
    del versions["onnxruntime-gpu"]

    def one(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", one)
    Pipeline.load(engines_dir).close()


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("tensorrt")),
                    reason="real TensorRT engines need a CUDA GPU and the tensorrt package")
def test_real_tensorrt_engines_are_validated_and_give_the_onnx_tokens(tmp_path):
    out = build_engines(None, tmp_path / "trt", "fp32", backend="tensorrt", progress=False)
    assert all(check["tensorrt"]["passed"] for check in load_manifest(out)["validation"].values())
    config = GenerationConfig(gen_length=16, block_length=8, cache="dual", refresh_interval=2)
    questions = ["What colour is the circle?", "How many shapes are there?"]
    with Pipeline.load(out, "tensorrt") as trt, Pipeline.load(out, "onnxruntime") as ort:
        assert [r.token_ids for r in trt.generate(questions, config=config)] == \
            [ort.generate(q, config=config).token_ids for q in questions]
