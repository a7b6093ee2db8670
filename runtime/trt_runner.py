"""TensorRT backend: the engines folder's `.plan` files, run on torch's CUDA stream with torch tensors.

As in the ONNX Runtime runner, the per-layer cache tensors are addresses of the layers of the runtime's
stacked buffers, so the cache is read (and, by a full forward over every row, written) in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .engines import open_engines
from .runner import Runner, empty_cache, per_layer, resolve_device

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
                 "BF16": torch.bfloat16}


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engines: str | Path, device: str | torch.device = "cuda"):
        super().__init__()
        self.engines = open_engines(engines)
        if torch.device(device).type != "cuda":
            raise ValueError("backend 'tensorrt' runs only on an NVIDIA GPU: pass device='cuda', or use "
                             "backend='onnxruntime' on the CPU")
        self.device = resolve_device(device, "tensorrt")
        self.contexts = {}

    def _activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as err:
            raise ValueError("backend 'tensorrt' needs the tensorrt package (pip install tensorrt)") from err
        eng = self.engines
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        parts = ["denoiser"] + (["vision", "projector"] if eng.config.has_vision else [])
        with torch.cuda.device(self.device):
            for part in parts:
                path = eng.part_file(part, "plan")
                if path is None:
                    raise ValueError(f"{eng.folder} has no TensorRT plan for {part!r}: build the engines with "
                                     f"`python -m exporter build --backend tensorrt` on a machine with a GPU")
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise ValueError(f"TensorRT could not load {path} (built by another TensorRT version or GPU?): "
                                     f"rebuild the engines on this machine")
                self.contexts[part] = (engine, engine.create_execution_context())
        self.config, self.folder, self.dtype = eng.config, eng.folder, eng.dtype
        self.max_sequence_length = eng.max_sequence_length
        self.embed_table, self.image_newline = eng.load_embeddings(self.device)
        self._placeholder = torch.zeros(1, device=self.device)

    def _deactivate_impl(self) -> None:
        self.contexts = {}
        self._placeholder = None
        self.embed_table = self.image_newline = None

    def _run(self, part: str, inputs: dict, outputs: dict | None = None) -> dict:
        """Set shapes and addresses, run on torch's stream. TensorRT writes every output: those not given
        in `outputs` are allocated."""
        import tensorrt as trt

        engine, context = self.contexts[part]
        keep = {name: t.contiguous() for name, t in inputs.items()}
        for name, t in keep.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                dims = self.engines.manifest["parts"][part].get("dims")
                raise ValueError(f"{self.name} | {part}: {name} of shape {list(t.shape)} is outside the engine's "
                                 f"optimization profile (dims {dims}): rebuild the engines for larger sizes")
            # An empty tensor (the full pass's cache) has no storage; TensorRT reads nothing at the address.
            context.set_tensor_address(name, t.data_ptr() or self._placeholder.data_ptr())
        outputs = dict(outputs or {})
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                if name not in outputs:
                    dtype = _TORCH_DTYPES[engine.get_tensor_dtype(name).name]
                    outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
                context.set_tensor_address(name, outputs[name].data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.name} | {part}: TensorRT execution failed (see the TensorRT log above)")
        return outputs

    def _vision_impl(self, pixel_values):
        return self._run("vision", {"pixel_values": pixel_values})["features"]

    def _projector_impl(self, features):
        return self._run("projector", {"features": features})["embeddings"]

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask,
                  "logits_index": logits_index, **empty_cache(present_keys)}
        presents = {**per_layer("present_keys", present_keys), **per_layer("present_values", present_values)}
        return self._run("denoiser", inputs, presents)["logits"]

    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start):
        return self._run("denoiser", {"inputs_embeds": inputs_embeds, "position_ids": position_ids,
                                             "attention_mask": attention_mask, "logits_index": logits_index,
                                             **per_layer("past_keys", past_keys),
                                             **per_layer("past_values", past_values),
                                             "past_mask": past_mask})["logits"]
