"""The reference backend: the llada_v PyTorch modules of a checkpoint folder, on CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

import llada_v
from llada_v.denoiser import SlotCache

from .runner import Runner, resolve_device


class TorchRunner(Runner):
    """Runs a checkpoint folder (not an engines folder) with PyTorch.

    fused_cache: run the cached pass on a llada_v SlotCache (each layer writes the queries' fresh K/V into their
    cache slots and attends over the whole buffer in one fused attention: the Triton kernel on CUDA where it
    supports the head dim and dtype, PyTorch's scaled_dot_product_attention otherwise), instead of the graphs'
    form (the explicit attention the ONNX graphs are traced from, with the fresh and the cached keys apart;
    README, Benchmarks, has the two timed). False runs the graphs' form, the plain version.

    dtype: the weights' and activations' dtype; default float32 on a CPU and bfloat16 on CUDA, the released
    checkpoint's own (float32 would send LLaDA-8B's cached pass through an fp32 attention kernel at head dim
    128 and hold 32 GB of weights). The Triton kernel takes the fp16 cached pass; fp32 and bf16 run SDPA.
    """

    name = "torch"

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 fused_cache: bool = True):
        super().__init__()
        self.checkpoint = Path(checkpoint)
        self.device = resolve_device(device, "torch")
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"torch backend dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.fused_cache = fused_cache
        self.model = None

    def _activate_impl(self) -> None:
        if (self.checkpoint / "manifest.json").is_file():
            raise ValueError(f"{self.checkpoint} is an engines folder: the torch backend loads a checkpoint folder "
                             f"(config.json + safetensors), use backend='onnxruntime' or 'tensorrt' for engines")
        try:
            self._adopt(llada_v.load_model(self.checkpoint, dtype=self.dtype, device=self.device))
        except llada_v.CheckpointError as err:
            raise ValueError(f"torch backend: {err}") from err

    @classmethod
    def from_model(cls, model: llada_v.LladaV, fused_cache: bool = True) -> "TorchRunner":
        """An active runner over a model already in memory, on its device and in its dtype (no tokenizer: the
        parts alone, e.g. to time them)."""
        weight = next(model.parameters())
        runner = cls(Path("."), weight.device, weight.dtype, fused_cache)
        runner._adopt(model)
        runner.is_active = True
        return runner

    def _adopt(self, model: llada_v.LladaV) -> None:
        self.model = model
        self.config = self.model.config
        self.folder = self.checkpoint
        self.max_sequence_length = self.config.language.max_position_embeddings
        self.embed_table = self.model.denoiser.embed_tokens.weight.detach()
        self.image_newline = self.model.image_newline.detach() if self.config.has_vision else None
        from triton_kernels.reference import SUPPORTED_HEAD_DIMS

        triton = (self.device.type == "cuda" and self.dtype == torch.float16
                  and self.config.language.head_dim in SUPPORTED_HEAD_DIMS)
        model.denoiser.set_attention("triton" if triton else "sdpa")

    def _deactivate_impl(self) -> None:
        self.model = self.embed_table = self.image_newline = None

    @torch.inference_mode()
    def _vision_impl(self, pixel_values):
        return self.model.vision_tower(pixel_values.to(self.dtype))

    @torch.inference_mode()
    def _projector_impl(self, features):
        return self.model.projector(features)

    @torch.inference_mode()
    def _denoise_full_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                           present_keys, present_values):
        logits, keys, values = self.model.denoiser(inputs_embeds, position_ids, attention_mask, logits_index)
        for layer, (k, v) in enumerate(zip(keys, values)):
            present_keys[layer].copy_(k)
            present_values[layer].copy_(v)
        return logits

    @torch.inference_mode()
    def _denoise_logits_impl(self, inputs_embeds, position_ids, attention_mask, logits_index):
        return self.model.denoiser(inputs_embeds, position_ids, attention_mask, logits_index)[0]

    @torch.inference_mode()
    def _denoise_cached_impl(self, inputs_embeds, position_ids, attention_mask, logits_index,
                             past_keys, past_values, past_mask, query_start, with_keys):
        if self.fused_cache:
            valid = past_mask.bool()
            valid[:, query_start:query_start + inputs_embeds.shape[1]] = attention_mask.bool()
            cache = {"slot_cache": SlotCache(past_keys, past_values, query_start, valid)}
        else:
            cache = {"past_keys": past_keys, "past_values": past_values, "past_mask": past_mask}
        logits, keys, _ = self.model.denoiser(inputs_embeds, position_ids, attention_mask, logits_index, **cache)
        return (logits, torch.stack(keys)) if with_keys else logits
