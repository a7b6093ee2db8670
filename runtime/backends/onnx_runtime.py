"""ONNX Runtime backend: the engines folder's ONNX parts, on the CPU or a GPU provider.

Inputs and outputs are torch tensors bound by pointer (IO binding), so on CUDA they stay on the GPU
between parts and steps; outputs are preallocated torch tensors of the shapes docs/engines.md gives.
On CUDA, ONNX Runtime runs on a stream of its own whose handle it is given (torch's default stream has
handle 0, which ONNX Runtime takes for "no user stream", and would then run on its own stream unordered
with torch's: the inputs torch has just written could still be in flight). Each run waits for torch's
stream first, and torch's stream waits for it after.
The graphs' per-layer cache tensors are bound to the layers of the runtime's stacked buffers: a cached
step reads the cache in place, and a full forward over every row writes it in place. One session runs
both denoiser passes (the full pass binds an empty cache), so the weights are held once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from exporter.engines_format import parts

from .engines import open_engines
from .runner import Runner, empty_cache, per_layer, resolve_device

# fp16 engines load to as much memory as fp32 ones on the CPU provider (README, Measured choices).
CPU_FP16_WARNING = ("fp16 engines on ONNX Runtime's CPU provider: it has few fp16 kernels, so it runs these "
                    "graphs in fp32 and keeps an fp32 copy of the weights: they take as much memory as fp32 "
                    "engines. On a CPU build fp32 engines (`python -m exporter build --precision fp32`), or int8 / "
                    "int4 for less memory; fp16 is for CUDA and TensorRT.")

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def check_one_flavour() -> None:
    """onnxruntime and onnxruntime-gpu install into the same `onnxruntime` folder, so with both installed the files
    of whichever came last are mixed with the other's (microsoft/onnxruntime#26996): refuse, saying how to fix it."""
    from importlib.metadata import PackageNotFoundError, version

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    if len(installed) == 2:
        raise ValueError(f"both {installed[0]} and {installed[1]} are installed; they share one package folder and "
                         f"break each other: keep one, e.g. `pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                         f"'onnxruntime-gpu>=1.22'` on a GPU machine (or 'onnxruntime>=1.22' on a CPU)")


class OnnxRuntimeRunner(Runner):
    """providers: ONNX Runtime execution provider names, by default CPUExecutionProvider on device "cpu"
    and CUDAExecutionProvider on "cuda". Every GPU provider asked for must load, or activation fails."""

    name = "onnxruntime"

    def __init__(self, engines: str | Path, device: str | torch.device = "cpu", providers: list[str] | None = None):
        super().__init__()
        self.engines = open_engines(engines)
        self.device = resolve_device(device, "onnxruntime")
        if providers is None:
            providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        gpu = [p for p in providers if p in GPU_PROVIDERS]
        if gpu and self.device.type != "cuda":
            raise ValueError(f"providers {gpu} run on a GPU: pass device='cuda'")
        if self.device.type == "cuda" and not gpu:
            raise ValueError(f"device {self.device} needs a GPU provider ({', '.join(GPU_PROVIDERS)}), got {providers}")
        self.providers = list(providers)
        self.sessions = {}
        self.stream: torch.cuda.Stream | None = None  # ONNX Runtime's own, on CUDA
        if self.engines.dtype == torch.float16 and self.providers == ["CPUExecutionProvider"]:
            warnings.warn(CPU_FP16_WARNING, stacklevel=4)  # the caller of Pipeline.load (through load_runner)

    def _activate_impl(self) -> None:
        check_one_flavour()
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ValueError("backend 'onnxruntime' needs the onnxruntime package (onnxruntime-gpu for CUDA)") from err
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise ValueError(f"ONNX Runtime provider(s) {missing} are not available here (available: {available}): "
                             f"install onnxruntime-gpu with a matching CUDA, or use device='cpu'")
        provider_list = [(p, self._provider_options(p)) for p in self.providers]
        if "CPUExecutionProvider" not in self.providers:
            provider_list.append(("CPUExecutionProvider", {}))  # for the few nodes a GPU provider does not take
        eng = self.engines
        options = ort.SessionOptions()
        if self.device.type == "cpu":
            # Between engine calls the loop runs small torch ops on the same cores. ONNX Runtime's
            # threads spinning after a call, or torch's OpenMP threads, would starve them (README, Measured
            # choices).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.loop_threads = 1
        for part in parts(eng.config.has_vision):
            path = eng.part_file(part, "onnx")
            if path is None:
                raise ValueError(f"{eng.folder}: the manifest names no onnx model for {part!r}: rebuild the engines")
            session = ort.InferenceSession(str(path), options, providers=provider_list)
            loaded = session.get_providers()
            failed = [p for p in self.providers if p not in loaded]
            if failed:
                raise ValueError(f"ONNX Runtime could not load provider(s) {failed} for {path.name} (loaded: {loaded}); "
                                 f"check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs, or use device='cpu'")
            self.sessions[part] = session
        self.config, self.folder, self.dtype = eng.config, eng.folder, eng.dtype
        self.limits, self.max_tiles = eng.limits, eng.max_tiles
        self.max_sequence_length = self.limits.max_sequence
        self.embed_table, self.image_newline = eng.load_embeddings(self.device)

    def _provider_options(self, provider: str) -> dict:
        if provider not in GPU_PROVIDERS:
            return {}
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return {"device_id": str(self.device.index), "has_user_compute_stream": "1",
                "user_compute_stream": str(self.stream.cuda_stream)}

    def _deactivate_impl(self) -> None:
        self.sessions = {}
        self.embed_table = self.image_newline = None

    def _run(self, part: str, inputs: dict, outputs: dict) -> None:
        binding = self.sessions[part].io_binding()
        kind, index = self.device.type, self.device.index or 0
        for names, bind in ((inputs, binding.bind_input), (outputs, binding.bind_output)):
            for name, t in names.items():
                bind(name, kind, index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        if self.stream is None:
            self.sessions[part].run_with_iobinding(binding)
            return
        torch_stream = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(torch_stream)
        self.sessions[part].run_with_iobinding(binding)
        torch_stream.wait_stream(self.stream)

    def _empty(self, shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def _vision_impl(self, pixel_values):
        n, v = pixel_values.shape[0], self.config.vision
        features = self._empty((n, v.tokens_per_tile, v.hidden_size))
        self._run("vision", {"pixel_values": pixel_values.contiguous()}, {"features": features})
        return features

    def _projector_impl(self, features):
        n, t, _ = features.shape
        embeddings = self._empty((n, t, self.config.language.hidden_size))
        self._run("projector", {"features": features.contiguous()}, {"embeddings": embeddings})
        return embeddings

    def _denoiser_inputs(self, inputs_embeds, position_ids, attention_mask, logits_index) -> dict:
        return {"inputs_embeds": inputs_embeds.contiguous(), "position_ids": position_ids.contiguous(),
                "attention_mask": attention_mask.contiguous(), "logits_index": logits_index.contiguous()}

    def _logits(self, logits_index) -> torch.Tensor:
        b, p = logits_index.shape
        return self._empty((b, p, self.config.language.vocab_size), torch.float32)

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        logits = self._logits(logits_index)
        inputs = self._denoiser_inputs(inputs_embeds, position_ids, attention_mask, logits_index)
        inputs.update(empty_cache(present_keys))
        outputs = {"logits": logits, **per_layer("present_keys", present_keys),
                   **per_layer("present_values", present_values)}
        self._run("denoiser", inputs, outputs)
        return logits

    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start, with_keys):
        inputs = self._denoiser_inputs(inputs_embeds, position_ids, attention_mask, logits_index)
        inputs.update(per_layer("past_keys", past_keys), **per_layer("past_values", past_values),
                      past_mask=past_mask.contiguous())
        logits = self._logits(logits_index)
        if not with_keys:
            self._run("denoiser", inputs, {"logits": logits})  # the queries' presents are not needed
            return logits
        b, q, _ = inputs_embeds.shape
        lm = self.config.language
        keys = self._empty((lm.num_hidden_layers, b, lm.num_attention_heads, q, lm.head_dim))
        self._run("denoiser", inputs, {"logits": logits, **per_layer("present_keys", keys)})
        return logits, keys
