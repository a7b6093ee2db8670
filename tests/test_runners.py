"""The runner contract, checked on every backend this machine has, and the errors of loading one."""

import importlib.util
import json
import shutil

import pytest
import torch

import llada_v
from exporter.build import build_engines
from runtime import GenerationConfig, Pipeline
from runtime.backends.onnx_runtime import OnnxRuntimeRunner
from runtime.backends.pytorch import TorchRunner


def ort_has_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
RUNNERS = ["torch", "onnxruntime",
           pytest.param("torch-cuda", marks=requires_cuda),
           pytest.param("onnxruntime-cuda", marks=pytest.mark.skipif(not ort_has_cuda(), reason="needs onnxruntime-gpu")),
           pytest.param("tensorrt", marks=pytest.mark.skipif(
               not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT"))]


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request, engines_dir, tmp_path_factory):
    if request.param.startswith("torch"):
        runner = TorchRunner(llada_v.SHIPPED_MODEL_DIR, device="cuda" if request.param == "torch-cuda" else "cpu")
    elif request.param.startswith("onnxruntime"):
        runner = OnnxRuntimeRunner(engines_dir, device="cuda" if request.param == "onnxruntime-cuda" else "cpu")
    else:
        from runtime.backends.tensorrt import TensorRTRunner

        plans = build_engines(None, tmp_path_factory.mktemp("plans") / "engines", "fp32", backend="tensorrt",
                              progress=False)
        runner = TensorRTRunner(plans)
    with runner:
        yield runner


@pytest.fixture(scope="module")
def reference():
    return TorchRunner(llada_v.SHIPPED_MODEL_DIR).activate()


def tolerance(runner) -> dict:
    # GPU matmuls may use TF32 and other reduction orders.
    return dict(atol=1e-4, rtol=1e-4) if runner.device.type == "cpu" else dict(atol=1e-2, rtol=1e-2)


def denoiser_inputs(runner, batch=2, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.config.language.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return runner.embed(ids.to(runner.device)), positions.to(runner.device), mask.to(runner.device)


def arange(n, runner, rows=2, start=0):
    return torch.arange(start, start + n, device=runner.device).expand(rows, n)


def test_parts_have_the_documented_shapes_and_dtypes(runner):
    cfg = runner.config
    v, lm = cfg.vision, cfg.language
    pixels = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1))
    features = runner.vision(pixels.to(runner.device))
    assert features.shape == (3, v.tokens_per_tile, v.hidden_size) and features.dtype == runner.dtype
    embeddings = runner.projector(features)
    assert embeddings.shape == (3, v.tokens_per_tile, lm.hidden_size) and embeddings.dtype == runner.dtype
    assert runner.image_newline.shape == (lm.hidden_size,)

    embeds, positions, mask = denoiser_inputs(runner)
    logits_index = torch.tensor([[4, 5, 6], [9, 10, 11]], device=runner.device)
    logits, keys, values = runner.denoise_full(embeds, positions, mask, logits_index)
    assert logits.shape == (2, 3, lm.vocab_size) and logits.dtype == torch.float32
    assert keys.shape == values.shape == (lm.num_hidden_layers, 2, lm.num_attention_heads, 12, lm.head_dim)
    assert logits.device == keys.device == features.device == runner.device


def test_parts_match_the_torch_reference(runner, reference):
    v = runner.config.vision
    pixels = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(runner.projector(runner.vision(pixels.to(runner.device))).cpu(),
                               reference.projector(reference.vision(pixels)), **tolerance(runner))
    embeds, positions, mask = denoiser_inputs(runner)
    ours = runner.denoise_full(embeds, positions, mask, arange(12, runner))
    theirs = reference.denoise_full(embeds.cpu(), positions.cpu(), mask.cpu(), torch.arange(12).expand(2, 12))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, **tolerance(runner))
    # the uncached loop's call: the full pass's logits, without writing the presents
    torch.testing.assert_close(runner.denoise_logits(embeds, positions, mask, arange(12, runner)), ours[0],
                               rtol=0, atol=0)


def test_cached_pass_on_a_fresh_cache_equals_the_full_pass(runner):
    """Right after a refresh the cache holds exactly the full pass's K/V, so the block's cached logits
    (dual: the block against the rest of the cache) equal the full pass's logits of the block."""
    embeds, positions, mask = denoiser_inputs(runner)
    full_logits, keys, values = runner.denoise_full(embeds, positions, mask, arange(4, runner, start=6))
    past_mask = mask.clone()
    past_mask[:, 6:10] = 0
    cached = runner.denoise_cached(embeds[:, 6:10], positions[:, 6:10], mask[:, 6:10], arange(4, runner),
                                   keys.clone(), values.clone(), past_mask, 6)
    torch.testing.assert_close(cached, full_logits, **tolerance(runner))


def test_cached_pass_gives_the_queries_fresh_keys(runner):
    """with_keys: the cached pass also returns its queries' fresh keys (what the drift policy reads); on a fresh
    cache they are the full pass's keys at the queries' slots, and the logits are those without with_keys."""
    embeds, positions, mask = denoiser_inputs(runner)
    _, keys, values = runner.denoise_full(embeds, positions, mask, arange(4, runner, start=6))
    past_mask = mask.clone()
    past_mask[:, 6:10] = 0
    args = embeds[:, 6:10], positions[:, 6:10], mask[:, 6:10], arange(4, runner)
    logits = runner.denoise_cached(*args, keys.clone(), values.clone(), past_mask, 6)
    got_logits, fresh = runner.denoise_cached(*args, keys.clone(), values.clone(), past_mask, 6, with_keys=True)
    torch.testing.assert_close(got_logits, logits, atol=0, rtol=0)
    assert fresh.shape == keys[:, :, :, 6:10].shape
    torch.testing.assert_close(fresh, keys[:, :, :, 6:10], **tolerance(runner))


def test_full_pass_writes_given_buffers_and_engines_bind_their_layers(runner, monkeypatch):
    """denoise_full writes the presents into buffers it is given (a KV cache's) and returns them; the
    engine runners bind layer i of those buffers, and of a cached step's past, by pointer: no copies."""
    bound = {}
    if runner.name != "torch":
        run = runner._run

        def spy(part, inputs, outputs=None):
            bound[part] = {name: t.data_ptr() for name, t in {**inputs, **(outputs or {})}.items()}
            return run(part, inputs, outputs)

        monkeypatch.setattr(runner, "_run", spy)
    lm = runner.config.language
    embeds, positions, mask = denoiser_inputs(runner)
    index = arange(4, runner, start=6)
    shape = (lm.num_hidden_layers, 2, lm.num_attention_heads, 12, lm.head_dim)
    expected = runner.denoise_full(embeds, positions, mask, index)
    keys, values = (torch.full(shape, float("nan"), dtype=runner.dtype, device=runner.device) for _ in range(2))
    logits, got_keys, got_values = runner.denoise_full(embeds, positions, mask, index, keys, values)
    assert got_keys is keys and got_values is values
    for got, want in zip((logits, keys, values), expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    full_pass = bound.get("denoiser")

    past_mask = mask.clone()
    past_mask[:, 6:10] = 0
    runner.denoise_cached(embeds[:, 6:10], positions[:, 6:10], mask[:, 6:10], arange(4, runner), keys, values,
                          past_mask, 6)
    if runner.name != "torch":
        for i in range(lm.num_hidden_layers):
            assert full_pass[f"present_keys.{i}"] == bound["denoiser"][f"past_keys.{i}"] == keys[i].data_ptr()
            assert full_pass[f"present_values.{i}"] == bound["denoiser"][f"past_values.{i}"] == values[i].data_ptr()


def test_inputs_are_checked(runner):
    embeds, positions, mask = denoiser_inputs(runner)
    index = torch.zeros(2, 1, dtype=torch.int64, device=runner.device)
    with pytest.raises(ValueError, match=rf"{runner.name} \| position_ids: received int32 \[2, 12\].*expected int64"):
        runner.denoise_full(embeds, positions.int(), mask, index)
    with pytest.raises(ValueError, match=r"inputs_embeds: received float64"):
        runner.denoise_full(embeds.double(), positions, mask, index)
    with pytest.raises(ValueError, match=r"attention_mask: received int64 \[2, 11\]"):
        runner.denoise_full(embeds, positions, mask[:, 1:], index)
    lm = runner.config.language
    strided = torch.empty(lm.num_hidden_layers, 2, lm.num_attention_heads, 12, 2 * lm.head_dim, dtype=runner.dtype,
                          device=runner.device)[..., ::2]
    with pytest.raises(ValueError, match=r"present_keys: each layer of the buffer must be contiguous"):
        runner.denoise_full(embeds, positions, mask, index, strided, strided.contiguous())
    with pytest.raises(ValueError, match=r"present_values: received \w+ \[\d+, 2, \d+, 11, \d+\]"):
        runner.denoise_full(embeds, positions, mask, index, None, strided[..., :11, :].contiguous())
    with pytest.raises(ValueError, match=r"pixel_values: received float32 \[1, 3, 32, 32\]"):
        runner.vision(torch.zeros(1, 3, 32, 32, device=runner.device))


def test_runner_must_be_activated(engines_dir):
    runner = OnnxRuntimeRunner(engines_dir)
    with pytest.raises(RuntimeError, match="onnxruntime \\| must be activated before calling embed"):
        runner.embed(torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["sdpa", "triton", "explicit"])
def test_fused_cached_pass_matches_the_module_forward(tmp_path, backend):
    """The torch runner's in-place cached pass (slot writes + one fused attention over the buffer) against the
    module's forward, on left-padded rows and on one unpadded row (no mask). The Triton branch (CUDA) runs here
    through triton_kernels.attention's PyTorch reference, on a model whose head dim the kernel supports."""
    lm = llada_v.LanguageConfig(vocab_size=425, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                                max_position_embeddings=512)
    torch.manual_seed(0)
    model = llada_v.LladaV(llada_v.LladaVConfig(language=lm, vision=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    llada_v.save_model(model, tmp_path, tokenizer_folder=llada_v.SHIPPED_MODEL_DIR)
    plain, fused = TorchRunner(tmp_path, fused_cache=False).activate(), TorchRunner(tmp_path).activate()
    fused.model.denoiser.set_attention(backend)
    embeds, positions, mask = denoiser_inputs(plain, length=16)
    _, keys, values = plain.denoise_full(embeds, positions, mask, torch.zeros(2, 1, dtype=torch.int64))
    changed = embeds + 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1))  # new tokens
    for rows in (slice(0, 2), slice(0, 1)):
        for start, end in ((8, 12), (8, 16)):  # dual: the block; prefix: the block and what follows
            past_mask = mask[rows].clone()
            past_mask[:, start:end] = 0
            args = (changed[rows, start:end], positions[rows, start:end], mask[rows, start:end],
                    torch.arange(4).expand(past_mask.shape[0], 4))
            cache = keys[:, rows].contiguous(), values[:, rows].contiguous()
            with torch.inference_mode():
                expected, fresh_keys, fresh_values = plain.model.denoiser(*args, *cache, past_mask)
            got = fused.denoise_cached(*args, *cache, past_mask, start)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            # The queries' fresh K/V went into their slots; every other slot is as it was.
            torch.testing.assert_close(cache[0][:, :, :, start:end], torch.stack(fresh_keys), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache[1][:, :, :, start:end], torch.stack(fresh_values), atol=1e-5, rtol=1e-5)
            for buffer, original in zip(cache, (keys, values)):
                assert torch.equal(buffer[:, :, :, :start], original[:, rows, :, :start])
                assert torch.equal(buffer[:, :, :, end:], original[:, rows, :, end:])


def test_fused_cached_pass_of_a_row_with_no_key_is_finite():
    """A batch's free place (all its slots masked) must not turn into NaN, as in the module's forward."""
    runner = TorchRunner(llada_v.SHIPPED_MODEL_DIR).activate()
    embeds, positions, mask = denoiser_inputs(runner, length=12)
    _, keys, values = runner.denoise_full(embeds, positions, mask, torch.zeros(2, 1, dtype=torch.int64))
    past_mask = mask.clone()
    past_mask[1] = 0
    query_mask = mask[:, 8:12].clone()
    query_mask[1] = 0
    logits = runner.denoise_cached(embeds[:, 8:12], positions[:, 8:12], query_mask, arange(4, runner), keys,
                                   values, past_mask, 8)
    assert torch.isfinite(logits).all()


# ---- loading errors ------------------------------------------------------------------------------------

def copy_engines(engines_dir, tmp_path):
    return shutil.copytree(engines_dir, tmp_path / "engines")


def test_missing_engines_folder(tmp_path):
    with pytest.raises(ValueError, match="engines folder .* does not exist"):
        Pipeline.load(tmp_path / "nowhere", backend="onnxruntime")


def test_folder_without_manifest(engines_dir, tmp_path):
    folder = copy_engines(engines_dir, tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(ValueError, match="has no manifest.json"):
        Pipeline.load(folder, backend="onnxruntime")


def test_half_written_folder(engines_dir, tmp_path):
    folder = copy_engines(engines_dir, tmp_path)
    (folder / "denoiser.onnx").unlink()
    with pytest.raises(ValueError, match="is incomplete: missing denoiser.onnx"):
        Pipeline.load(folder, backend="onnxruntime")


def test_other_format_version(engines_dir, tmp_path):
    folder = copy_engines(engines_dir, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1  # stacked cache tensors
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version 1, this runtime reads version 4"):
        Pipeline.load(folder, backend="onnxruntime")


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_config(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **changes}))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _swap(folder, a, b):
    (folder / a).rename(folder / "swap")
    (folder / b).rename(folder / a)
    (folder / "swap").rename(folder / b)


def _rewrite_embeddings(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "embeddings.safetensors")
    edit(tensors)
    save_file(tensors, folder / "embeddings.safetensors")


# The shipped model's vocabulary: its tokenizer's length (the loader cuts the head to it).
SHIPPED_VOCAB = len(llada_v.load_tokenizer(llada_v.SHIPPED_MODEL_DIR))


@pytest.mark.parametrize("corrupt, match", [
    (lambda f: _edit_manifest(f, lambda m: m.update(parts=list(m["parts"]))), "parts must be an object"),
    (lambda f: _edit_manifest(f, lambda m: m["parts"].update(vision="vision.onnx")), "part 'vision' must be an object"),
    (lambda f: _edit_manifest(f, lambda m: m["parts"]["vision"].update(files="vision.onnx")),
     "part 'vision': files must be a list of file names"),
    (lambda f: _edit_manifest(f, lambda m: m.update(limits="long")), "limits 'long'"),
    (lambda f: _edit_manifest(f, lambda m: m["limits"].update(max_batch=0)), "max_batch must be a positive integer"),
    (lambda f: _edit_manifest(f, lambda m: m["parts"]["denoiser"].pop("profiles")),
     "part 'denoiser': profiles must map each profile"),
    (lambda f: _edit_manifest(f, lambda m: m.update(precision="fp16")), "is not a fp16 graph though the manifest says"),
    (lambda f: (f / "projector.onnx").write_bytes(b""), "projector.onnx is not the projector graph"),
    (lambda f: _truncate(f / "denoiser.onnx"), "denoiser.onnx is not a readable ONNX model"),
    (lambda f: _swap(f, "denoiser.onnx", "projector.onnx"), "denoiser.onnx is not the denoiser graph"),
    (lambda f: _edit_config(f, num_hidden_layers=2), "is not the denoiser graph of a 2-layer model"),
    (lambda f: _edit_config(f, hidden_size=96, num_attention_heads=2, num_key_value_heads=2),
     "hidden_size 96: config.json was changed after the build"),
    (lambda f: _edit_config(f, vocab_size=300), f"gives logits of width {SHIPPED_VOCAB} but config.json implies 300"),
    (lambda f: _truncate(f / "embeddings.safetensors"), "cannot read .*embeddings.safetensors"),
    (lambda f: _rewrite_embeddings(f, lambda t: t.pop("embed_tokens")), "holds embed_tokens of shape None"),
    (lambda f: _rewrite_embeddings(f, lambda t: t.update(embed_tokens=t["embed_tokens"][:10])),
     f"holds embed_tokens of shape \\[10, 192\\], config.json implies \\[{SHIPPED_VOCAB}, 192\\]"),
])
def test_malformed_engines_folders_are_refused_when_opened(engines_dir, tmp_path, corrupt, match):
    folder = copy_engines(engines_dir, tmp_path)
    corrupt(folder)
    with pytest.raises(ValueError, match=match):
        Pipeline.load(folder, backend="onnxruntime")


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.onnx", "link.onnx"])
def test_manifest_files_must_be_inside_the_folder(engines_dir, tmp_path, name):
    folder = copy_engines(engines_dir, tmp_path)
    shutil.copy2(folder / "projector.onnx", tmp_path / "outside.onnx")
    (folder / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    _edit_manifest(folder, lambda m: m["parts"]["projector"].update(files=[name], onnx=name))
    with pytest.raises(ValueError, match=f"names '{name}', which is not a file inside"):
        Pipeline.load(folder, backend="onnxruntime")
    _edit_manifest(folder, lambda m: m.update(embeddings="../outside.onnx"))
    with pytest.raises(ValueError, match="which is not a file inside"):
        Pipeline.load(folder, backend="onnxruntime")


def test_unknown_backend(engines_dir):
    with pytest.raises(ValueError, match="unknown backend 'onnx': use one of onnxruntime, tensorrt, torch"):
        Pipeline.load(engines_dir, backend="onnx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_gpu_backends_fail_clearly_without_a_gpu(engines_dir):
    with pytest.raises(ValueError, match="tensorrt.*needs an NVIDIA GPU"):
        Pipeline.load(engines_dir, backend="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime.*needs an NVIDIA GPU"):
        Pipeline.load(engines_dir, backend="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match="torch.*needs an NVIDIA GPU"):
        Pipeline.load(llada_v.SHIPPED_MODEL_DIR, backend="torch", device="cuda")
    with pytest.raises(ValueError, match=r"providers \['CUDAExecutionProvider'\] run on a GPU"):
        Pipeline.load(engines_dir, backend="onnxruntime", providers=["CUDAExecutionProvider"])


def test_gpu_provider_that_does_not_load_is_an_error(engines_dir, monkeypatch):
    """ONNX Runtime falls back to the CPU silently when a GPU provider fails; the runner must not."""
    import onnxruntime as ort

    runner = OnnxRuntimeRunner(engines_dir)
    runner.providers = ["CUDAExecutionProvider"]  # as if device="cuda" had been accepted
    runner._provider_options = lambda provider: {}
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, options, providers: real_session(path, options, providers=["CPUExecutionProvider"]))
    with pytest.raises(ValueError, match=r"could not load provider\(s\) \['CUDAExecutionProvider'\]"):
        runner.activate()


def test_torch_backend_wants_a_checkpoint_folder(engines_dir):
    with pytest.raises(ValueError, match="is an engines folder: the torch backend loads a checkpoint folder"):
        Pipeline.load(engines_dir, backend="torch")


def test_calls_larger_than_the_engines_take_are_split(engines_dir):
    """Rows beyond the engines' max_batch and tiles beyond their max_tiles go in further calls, with the results
    of one call."""
    import dataclasses

    runner = Pipeline.load(engines_dir).runner
    lm, vis = runner.config.language, runner.config.vision
    tiles = torch.rand(5, vis.num_channels, vis.image_size, vis.image_size) * 2 - 1
    embeds = torch.randn(5, 9, lm.hidden_size)
    positions = torch.arange(9).expand(5, 9).contiguous()
    mask, index = torch.ones(5, 9, dtype=torch.int64), torch.arange(3).expand(5, 3).contiguous()
    whole_vision = runner.vision(tiles)
    whole_logits, whole_keys, _ = runner.denoise_full(embeds, positions, mask, index)
    whole_cached = runner.denoise_cached(embeds[:, :2], positions[:, :2], mask[:, :2], index[:, :2], whole_keys,
                                         whole_keys, mask, 0)
    runner.limits, runner.max_tiles = dataclasses.replace(runner.limits, max_batch=2), 2
    sizes = []
    for method in ("_vision_impl", "_denoise_full_impl", "_denoise_cached_impl"):
        original = getattr(runner, method)
        setattr(runner, method, lambda first, *rest, _original=original: sizes.append(len(first)) or
                _original(first, *rest))
    torch.testing.assert_close(runner.vision(tiles), whole_vision)
    logits, keys, _ = runner.denoise_full(embeds, positions, mask, index)
    torch.testing.assert_close(logits, whole_logits)
    torch.testing.assert_close(keys, whole_keys)
    torch.testing.assert_close(runner.denoise_cached(embeds[:, :2], positions[:, :2], mask[:, :2], index[:, :2],
                                                     whole_keys, whole_keys, mask, 0), whole_cached)
    assert sizes == [2, 2, 1] * 3  # tiles, full pass rows, cached pass rows
    with pytest.raises(ValueError, match="more than these engines take .* rebuild them with a larger --max-block"):
        runner.denoise_logits(embeds, positions, mask, torch.zeros(5, runner.limits.max_block + 1, dtype=torch.int64))


def test_settings_beyond_the_engines_limits_are_refused_before_any_work(engines_dir):
    pipe = Pipeline.load(engines_dir)
    assert (pipe.runner.limits.max_block, pipe.runner.limits.max_gen_length) == (256, 1024)
    with pytest.raises(ValueError, match=r"block_length 512 is more than these engines decode in one call \(256\): "
                                         r"lower block_length, or rebuild .* --max-block 512"):
        pipe.generate("Hi", config=GenerationConfig(gen_length=512, block_length=512))
    with pytest.raises(ValueError, match=r"with cache='prefix' .* gen_length 1280 .* \(1024\): use cache='dual'"):
        pipe.generate("Hi", config=GenerationConfig(gen_length=1280, block_length=256, cache="prefix"))


def test_torch_backend_defaults_to_the_checkpoints_bf16_on_cuda(monkeypatch):
    import runtime.backends.pytorch
    from runtime.backends.pytorch import TorchRunner

    assert TorchRunner(llada_v.SHIPPED_MODEL_DIR, "cpu").dtype == torch.float32
    monkeypatch.setattr(runtime.backends.pytorch, "resolve_device", lambda device, backend: torch.device("cuda", 0))
    assert TorchRunner(llada_v.SHIPPED_MODEL_DIR, "cuda").dtype == torch.bfloat16
    assert TorchRunner(llada_v.SHIPPED_MODEL_DIR, "cuda", torch.float16).dtype == torch.float16
