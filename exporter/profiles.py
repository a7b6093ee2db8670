"""What one call of an engine may take: the build's limits, the optimization profiles derived from them, and
the memory an engine needs at their largest shapes.

A TensorRT engine accepts only shapes inside its optimization profiles, and the runtime keeps every call
inside them for every backend (it splits larger batches and tile sets into calls the engines take). The
denoiser has two profiles, because its two passes have very different shapes:
- `full`: the whole sequence with an empty cache (past_sequence 0): queries up to `max_sequence`;
- `cached`: the block (dual cache) or the block and the answer after it (prefix cache), up to
  `max_gen_length` queries, against a cache of up to `max_sequence` slots.
In both, the logits are computed only at the block being decoded (`positions` <= `max_block`), never at every
position: a batch of four LLaDA-8B rows over 16,384 positions would take 33 GB of float32 logits alone.

The activation estimate is made from the spec table (onnx_export.part_specs) at each profile's largest shapes:
the part's inputs and outputs (the runtime's KV cache buffers among them) plus the largest working set of one
layer, which the engine's layers share: the attention scores and their softmax in float32, or the MLP's gate,
up and product, beside the hidden states. It is an upper estimate for what TensorRT's kernels hold (a fused
attention keeps no score matrix), made before the build so that a build whose engines cannot run is refused
with the flag to lower.
"""

from __future__ import annotations

import torch

from llada_v import LladaV, LladaVConfig

from .engines_format import DimRange, EngineLimits
from .onnx_export import PRECISIONS, PartSpec, TensorSpec, part_specs
from .quantize import BLOCK_SIZE

# The GPU the default limits are sized for: an 80 GB card (H100, A100 80 GB).
DEFAULT_GPU_BYTES = 80e9
# LLaDA-V's model length (its tokenizer_model_max_length); its position table has 16,384, where one row of the
# full pass alone would need ~79 GB of activations.
DEFAULT_MAX_SEQUENCE = 8192
BATCH_CHOICES = (8, 4, 2, 1)  # the default max_batch: the first that fits DEFAULT_GPU_BYTES
DEFAULT_MAX_BLOCK = 256  # the official demo decodes in blocks of 128; Fast-dLLM's benchmarks use 32
DEFAULT_MAX_GEN_LENGTH = 1024  # Fast-dLLM measures answers of up to 1024 tokens
_BYTES = {"float32": 4, "float16": 2, "int64": 8}
# Bytes a weight takes in the finished engines (int8/int4: the levels and one fp32 scale per block; int4 also a
# 4-bit zero point per block).
ENGINE_BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1 + 4 / BLOCK_SIZE, "int4": 0.5 + 4.5 / BLOCK_SIZE}


Profiles = dict[str, dict[str, DimRange]]  # profile name -> symbolic dimension -> range


def model_length(cfg: LladaVConfig) -> int:
    """The longest sequence the model is meant for: its prompt limit, else its position table."""
    lm = cfg.language
    return min(cfg.tokenizer_model_max_length or lm.max_position_embeddings, lm.max_position_embeddings)


def part_profiles(cfg: LladaVConfig, limits: EngineLimits) -> dict[str, Profiles]:
    """Every part's optimization profiles, in the order TensorRT numbers them."""
    batch = DimRange(1, 1, limits.max_batch)
    positions = DimRange(1, min(32, limits.max_block), limits.max_block)
    cached_queries = DimRange(1, min(32, limits.max_gen_length), limits.max_gen_length)
    profiles = {"denoiser": {
        "full": {"batch": batch, "sequence": DimRange(1, min(1024, limits.max_sequence), limits.max_sequence),
                 "positions": positions, "past_sequence": DimRange(0, 0, 0)},
        "cached": {"batch": batch, "sequence": cached_queries, "positions": positions,
                   "past_sequence": DimRange(1, min(1024, limits.max_sequence), limits.max_sequence)}}}
    if cfg.vision is not None:
        max_grid = max((w // cfg.vision.image_size) * (h // cfg.vision.image_size) for w, h in cfg.image_grid_pinpoints)
        tiles = {"num_tiles": DimRange(1, 1 + cfg.max_tiles_before_shrink, 1 + max_grid)}  # a global view + the grid
        profiles["vision"] = profiles["projector"] = {"all": tiles}
    return profiles


def default_limits(cfg: LladaVConfig, precision: str, max_sequence: int | None = None, max_block: int | None = None,
                   max_gen_length: int | None = None, max_batch: int | None = None,
                   gpu_bytes: float = DEFAULT_GPU_BYTES) -> EngineLimits:
    """The limits asked for, each missing one defaulted: max_sequence the model's length (model_length) up to
    DEFAULT_MAX_SEQUENCE, max_block
    DEFAULT_MAX_BLOCK, max_gen_length DEFAULT_MAX_GEN_LENGTH or max_block if larger (each within the ones before
    it), max_batch the largest of BATCH_CHOICES whose engines fit `gpu_bytes` (weights and every profile's
    activations), else 1. ValueError when the limits given contradict each other."""
    max_sequence = max_sequence or min(model_length(cfg), DEFAULT_MAX_SEQUENCE)
    max_gen_length = max_gen_length or min(max(DEFAULT_MAX_GEN_LENGTH, max_block or 0), max_sequence)
    max_block = max_block or min(DEFAULT_MAX_BLOCK, max_gen_length)
    if max_batch is None:
        for max_batch in BATCH_CHOICES:
            limits = EngineLimits(max_batch, max_sequence, max_block, max_gen_length)
            if engine_bytes(cfg, precision, limits) <= gpu_bytes:
                return limits
    return EngineLimits(max_batch, max_sequence, max_block, max_gen_length)


def engine_bytes(cfg: LladaVConfig, precision: str, limits: EngineLimits) -> float:
    """What the engines need on the device: the weights and the largest profile's activations."""
    largest = max(bytes_ for _, _, bytes_ in activation_table(cfg, precision, limits))
    return weight_count(cfg) * ENGINE_BYTES_PER_WEIGHT[precision] + largest


def weight_count(cfg: LladaVConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LladaV(cfg).parameters())


def activation_table(cfg: LladaVConfig, precision: str, limits: EngineLimits) -> list[tuple[str, str, float]]:
    """(part, profile, estimated bytes of inputs, outputs and working set at the profile's largest shapes)."""
    specs = part_specs(cfg, precision)
    return [(part, name, activation_bytes(specs[part], {d: r.max for d, r in dims.items()}, cfg, precision))
            for part, profiles in part_profiles(cfg, limits).items() for name, dims in profiles.items()]


def activation_bytes(spec: PartSpec, dims: dict[str, int], cfg: LladaVConfig, precision: str) -> float:
    """Inputs, outputs and the largest per-layer working set of one call at `dims` (estimate)."""
    act = _BYTES[PRECISIONS[precision]]

    def size(tensor: TensorSpec) -> int:
        count = 1
        for extent in tensor.concrete_shape(dims):
            count *= extent
        return count * _BYTES[tensor.dtype]

    io = sum(size(t) for t in spec.inputs + spec.outputs)
    if spec.name == "denoiser":
        lm = cfg.language
        b, q, lc = dims["batch"], dims["sequence"], dims["past_sequence"]
        scores = 2 * b * lm.num_attention_heads * q * (lc + q) * 4  # scores and probabilities, float32
        mlp = 3 * b * q * lm.intermediate_size * act
        hidden = 4 * b * q * lm.hidden_size * 4
    else:
        vis = cfg.vision
        n, t = dims["num_tiles"], vis.tokens_per_tile
        scores = 2 * n * vis.num_attention_heads * t * t * 4 if spec.name == "vision" else 0
        mlp = 3 * n * t * (vis.intermediate_size if spec.name == "vision" else cfg.language.hidden_size) * act
        hidden = 4 * n * t * max(vis.hidden_size, cfg.language.hidden_size) * 4
    return io + max(scores, mlp) + hidden


def profile_for(part: str, dims: dict[str, int]) -> str:
    """The profile a call of `part` at `dims` runs in."""
    if part != "denoiser":
        return "all"
    return "full" if dims["past_sequence"] == 0 else "cached"


def within(profile: dict[str, DimRange], dims: dict[str, int]) -> dict[str, int]:
    """`dims` with every size cut to the profile's range."""
    return {name: max(profile[name].min, min(size, profile[name].max)) for name, size in dims.items()}
