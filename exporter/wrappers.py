"""One thin nn.Module per exported graph: flat tensors in, a flat tuple of tensors out.

The wrappers add no computation; they pin the argument order and the outputs of each graph so that
`torch.onnx.export` sees exactly the signature of the engines-folder contract (docs/engines.md).
Shapes use the symbols of the spec table in `onnx_export.part_specs`.
"""

from __future__ import annotations

import torch
from torch import nn

from llada_v import LladaV, LladaVConfig


class VisionGraph(nn.Module):
    """pixel_values float32 [num_tiles, 3, S, S] -> features dtype [num_tiles, T, Cv].

    The input stays float32 whatever the precision: the tower casts it to its weights' dtype.
    """

    def __init__(self, model: LladaV):
        super().__init__()
        self.vision_tower = model.vision_tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values)


class ProjectorGraph(nn.Module):
    """features dtype [num_tiles, T, Cv] -> embeddings dtype [num_tiles, T, C]."""

    def __init__(self, model: LladaV):
        super().__init__()
        self.projector = model.projector

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class DenoiserGraph(nn.Module):
    """Both denoiser passes: the queries attend to the cache (where past_mask is 1) and to themselves; with
    an empty cache (past_sequence 0) it is the full pass.

    inputs_embeds dtype [batch, sequence, C], position_ids / attention_mask int64 [batch, sequence],
    logits_index int64 [batch, positions], then `past`: past_keys.0 .. past_keys.{n-1}, past_values.0 ..
    past_values.{n-1} dtype [batch, H, past_sequence, D] and past_mask int64 [batch, past_sequence]
    -> logits float32 [batch, positions, V], present_keys.0 .. present_keys.{n-1}, present_values.0 ..
    present_values.{n-1} dtype [batch, H, sequence, D]: the queries' keys/values.
    Called without `past` it is the module's own full pass: validation's reference for past_sequence 0.
    """

    def __init__(self, model: LladaV):
        super().__init__()
        self.denoiser = model.denoiser

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index, *past):
        n = len(self.denoiser.layers)
        cache = dict(past_keys=past[:n], past_values=past[n:2 * n], past_mask=past[2 * n]) if past else {}
        logits, keys, values = self.denoiser(inputs_embeds, position_ids, attention_mask, logits_index, **cache)
        return logits, *keys, *values


class TransposedLinear(nn.Module):
    """nn.Linear with its weight stored as [in, out]: `x @ weight_t + bias`, the MatMul the exporter writes
    for nn.Linear anyway, without the transposed copy of every weight its constant folding makes (an
    extra copy of all the weights in memory while tracing)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] view, for code that reads the weight's dtype (the projector does)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def weightless_model(cfg: LladaVConfig, dtype: torch.dtype) -> LladaV:
    """LladaV of `cfg` to trace the graphs from, without its weights: linear layers transposed as the build
    traces them, every parameter an uninitialised placeholder of its shape and `dtype`. The exporter traces
    with export_params=False and writes the weights from the checkpoint, so their values never matter to the
    trace. A large placeholder is a fresh mapping of the OS's zero pages, resident only where written (its
    first element) or copied: an 8B model is traced in the memory of its graph. Dense, not one element
    expanded to the shape: the tracer's MatMul and the exporter's passes then copy no weight (README, Measured
    choices). Each placeholder's first element
    is its own number: the exporter merges parameters of equal values into one initializer."""
    with torch.device("meta"):
        model = LladaV(cfg)
    transpose_linear_weights(model)
    params = [(module, name, param) for module in model.modules() for name, param in module.named_parameters(recurse=False)]
    if len(params) > 2048:  # float16 holds every integer up to 2048 exactly
        raise ValueError(f"{len(params)} parameters: more than the placeholders can tell apart")
    for number, (module, name, param) in enumerate(params, start=1):
        placeholder = torch.empty(param.shape, dtype=dtype)
        placeholder.view(-1)[0] = number
        setattr(module, name, nn.Parameter(placeholder, requires_grad=False))
    return model.eval()


def transpose_linear_weights(model: nn.Module) -> None:
    """Replace every nn.Linear of `model` by a TransposedLinear under the same name (node scopes keep
    naming the module path), one weight at a time, so memory grows by one weight at most."""
    # (parent, name) pairs, not the layers themselves: a list of them would keep every old weight alive.
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, nn.Linear)]
    for parent, name in places:
        setattr(parent, name, TransposedLinear(getattr(parent, name)))


GRAPHS: dict[str, type[nn.Module]] = {
    "vision": VisionGraph,
    "projector": ProjectorGraph,
    "denoiser": DenoiserGraph,
}


def wrap(part: str, model: LladaV) -> nn.Module:
    """The graph module of `part` around `model`'s weights (shared, not copied), in eval mode."""
    return GRAPHS[part](model).eval()
