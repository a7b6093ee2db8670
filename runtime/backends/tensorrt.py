"""TensorRT backend: the engines folder's `.plan` files, run with torch tensors (exporter/trt_plan.py: an
execution context per optimization profile, activation memory sized per call, aligned addresses, a stream of
its own ordered with torch's).

As in the ONNX Runtime runner, the per-layer cache tensors are addresses of the layers of the runtime's
stacked buffers, so the cache is read (and, by a full forward over every row, written) in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.engines_format import parts

from .engines import open_engines
from .runner import Runner, empty_cache, per_layer, resolve_device


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engines: str | Path, device: str | torch.device = "cuda"):
        super().__init__()
        self.engines = open_engines(engines)
        if torch.device(device).type != "cuda":
            raise ValueError("backend 'tensorrt' runs only on an NVIDIA GPU: pass device='cuda', or use "
                             "backend='onnxruntime' on the CPU")
        self.device = resolve_device(device, "tensorrt")
        self.plans = {}

    def _activate_impl(self) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError as err:
            raise ValueError("backend 'tensorrt' needs the tensorrt package (pip install '.[gpu]')") from err
        from exporter.trt_plan import PlanError, PlanExecutor

        eng = self.engines
        for part in parts(eng.config.has_vision):
            path = eng.part_file(part, "plan")
            if path is None:
                raise ValueError(f"{eng.folder} has no TensorRT plan for {part!r}: build the engines with "
                                 f"`python -m exporter build --backend tensorrt` on a machine with a GPU")
            try:
                self.plans[part] = PlanExecutor(path, self.device, list(eng.manifest["parts"][part]["profiles"]))
            except PlanError as err:
                raise ValueError(str(err)) from err
        self.config, self.folder, self.dtype = eng.config, eng.folder, eng.dtype
        self.limits, self.max_tiles = eng.limits, eng.max_tiles
        self.max_sequence_length = self.limits.max_sequence
        self.embed_table, self.image_newline = eng.load_embeddings(self.device)

    def _deactivate_impl(self) -> None:
        self.plans = {}
        self.embed_table = self.image_newline = None

    def _vision_impl(self, pixel_values):
        return self.plans["vision"].run("all", {"pixel_values": pixel_values})["features"]

    def _projector_impl(self, features):
        return self.plans["projector"].run("all", {"features": features})["embeddings"]

    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask,
                  "logits_index": logits_index, **empty_cache(present_keys)}
        presents = {**per_layer("present_keys", present_keys), **per_layer("present_values", present_values)}
        return self.plans["denoiser"].run("full", inputs, presents)["logits"]

    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start, with_keys):
        inputs = {"inputs_embeds": inputs_embeds, "position_ids": position_ids, "attention_mask": attention_mask,
                  "logits_index": logits_index, **per_layer("past_keys", past_keys),
                  **per_layer("past_values", past_values), "past_mask": past_mask}
        outputs = self.plans["denoiser"].run("cached", inputs)  # TensorRT writes every output, the presents too
        if not with_keys:
            return outputs["logits"]
        layers = range(self.config.language.num_hidden_layers)
        return outputs["logits"], torch.stack([outputs[f"present_keys.{i}"] for i in layers])
