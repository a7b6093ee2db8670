"""Configuration of a LLaDA-V model: the SigLIP vision tower, the projector and the denoiser.

Defaults are the released model's sizes. `config.json` keeps the LLaVA/LLaDA layout of the real
checkpoint: language fields at the top level, `mm_*` fields for the multimodal parts, and (our
addition, since the real file names the vision tower by hub id instead) an optional `vision_config`.
A config.json in the OLMo-style layout of the text-only LLaDA models (`d_model`, `n_layers`, ...) is read
as the "llada" family (llada_layout.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import llada_layout
from .errors import CheckpointError

# The project's own small model, loaded through the same code as a real checkpoint.
SHIPPED_MODEL_DIR = Path(__file__).parent / "shipped_model"


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    # Encoder layers that run. SigLIP so400m has 27; LLaDA-V drops the last (mm_vision_select_layer -2).
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class LanguageConfig:
    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Model families: whose official code a model follows (its checkpoint layout and, in the runtime, its decoding).
LLADA_V = "llada_v"  # LLaDA-V, and its language tower alone in LLaMA names (a folder without vision keys)
LLADA = "llada"  # the text-only LLaDA models in their released OLMo-style layout (LLaDA-8B-Instruct/Base, LLaDA 1.5)
FAMILIES = (LLADA_V, LLADA)


def default_grid_pinpoints(tile: int) -> tuple[tuple[int, int], ...]:
    """LLaVA-OneVision's `(1x1),...,(6x6)`: every grid of 1 to 6 tiles per side, as (width, height) in pixels."""
    return tuple((tile * i, tile * j) for i in range(1, 7) for j in range(1, 7))


@dataclass(frozen=True)
class LladaVConfig:
    language: LanguageConfig = field(default_factory=LanguageConfig)
    # None for a plain LLaDA language-model folder (text only).
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = default_grid_pinpoints(384)  # (width, height)
    # `anyres_max_4`: the merged grid feature map is shrunk when it holds more than 4 tiles' worth.
    max_tiles_before_shrink: int = 4
    # The longest spliced prompt (image embeddings included), None for no limit. The official code
    # silently truncates a longer prompt here (llava_arch.py:595-598); the runtime refuses it instead.
    tokenizer_model_max_length: int | None = None
    family: str = LLADA_V

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise CheckpointError(f"unknown model family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        if self.family == LLADA and self.vision is not None:
            raise CheckpointError("the LLaDA family is text-only: it has no vision tower")
        lm = self.language
        if lm.hidden_size % lm.num_attention_heads:
            raise CheckpointError(f"hidden_size {lm.hidden_size} is not divisible by num_attention_heads {lm.num_attention_heads}")
        if lm.head_dim % 2:
            raise CheckpointError(f"head dim {lm.head_dim} must be even for rotary embeddings")
        if lm.num_key_value_heads != lm.num_attention_heads:
            raise CheckpointError("LLaDA uses plain multi-head attention: num_key_value_heads must equal num_attention_heads")

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    # ---- config.json ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> "LladaVConfig":
        if llada_layout.is_llada_config(raw):
            return cls._from_llada_layout(raw)
        try:
            language = _pick(LanguageConfig, raw)
            if raw.get("rope_scaling") is not None:
                raise CheckpointError(f"rope_scaling {raw['rope_scaling']!r} is not implemented: LLaDA uses plain "
                                      f"RoPE (rope_scaling null)")
            is_multimodal = "mm_vision_tower" in raw or "vision_config" in raw
            if not is_multimodal:
                return cls(language=language, vision=None)
            vision = _pick(VisionConfig, raw.get("vision_config", {}))
            select_layer = raw.get("mm_vision_select_layer", -2)
            if "vision_config" in raw and "num_hidden_layers" in raw["vision_config"]:
                # vision_config describes the SigLIP checkpoint; select_layer -2 drops its last layer.
                layers = raw["vision_config"]["num_hidden_layers"] + 1 + select_layer
                vision = dataclasses.replace(vision, num_hidden_layers=layers)
            if raw.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
                raise CheckpointError(f"mm_hidden_size {raw['mm_hidden_size']} != vision hidden_size {vision.hidden_size}")
            if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"unsupported mm_projector_type {raw['mm_projector_type']!r}; LLaDA-V uses 'mlp2x_gelu'")
            pinpoints = _parse_pinpoints(raw.get("image_grid_pinpoints"), vision.image_size)
            aspect = raw.get("image_aspect_ratio", "anyres_max_4")
            match = re.fullmatch(r"anyres_max_(\d+)", aspect)
            if not match:
                raise CheckpointError(f"unsupported image_aspect_ratio {aspect!r}; expected 'anyres_max_N'")
            _refuse_unimplemented(raw)
            return cls(language=language, vision=vision, image_grid_pinpoints=pinpoints,
                       max_tiles_before_shrink=int(match.group(1)),
                       tokenizer_model_max_length=_optional_length(raw, "tokenizer_model_max_length"))
        except (TypeError, KeyError) as err:
            raise CheckpointError(f"malformed config: {err}") from err

    @classmethod
    def _from_llada_layout(cls, raw: dict) -> "LladaVConfig":
        multimodal = [key for key in ("mm_vision_tower", "vision_config") if key in raw]
        if multimodal:
            raise CheckpointError(f"config.json mixes the text-only LLaDA layout (it names "
                                  f"{', '.join(k for k in llada_layout.MARKERS if k in raw)}) with the multimodal keys "
                                  f"{', '.join(multimodal)}: a LLaDA-V config.json names its language sizes "
                                  f"hidden_size, num_hidden_layers, ...")
        return cls(language=LanguageConfig(**llada_layout.language_fields(raw)), vision=None, family=LLADA)

    def to_dict(self) -> dict:
        if self.family == LLADA:
            return llada_layout.config_dict(self.language)
        raw = {"architectures": ["LladaVModel"] if self.has_vision else ["LLaDAModelLM"],
               "model_type": "llava_llada" if self.has_vision else "llada",
               **dataclasses.asdict(self.language), "hidden_act": "silu", "tie_word_embeddings": False}
        if self.has_vision:
            vision = dataclasses.asdict(self.vision)
            vision["num_hidden_layers"] += 1  # stored as the SigLIP checkpoint's depth, see from_dict
            raw.update({"mm_vision_tower": "siglip", "vision_config": vision, "mm_vision_select_layer": -2,
                        "mm_hidden_size": self.vision.hidden_size, "mm_projector_type": "mlp2x_gelu",
                        "mm_patch_merge_type": "spatial_unpad", "mm_use_im_start_end": False,
                        "mm_use_im_patch_token": False,
                        "image_aspect_ratio": f"anyres_max_{self.max_tiles_before_shrink}",
                        "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]})
            if self.tokenizer_model_max_length is not None:
                raw["tokenizer_model_max_length"] = self.tokenizer_model_max_length
        return raw

    @classmethod
    def from_file(cls, path: str | Path) -> "LladaVConfig":
        return cls.from_dict(read_config_json(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a checkpoint folder needs a config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return raw


def _pick(config_cls, raw: dict):
    """Build a config dataclass from the keys of `raw` it knows, checking their types."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in raw:
            value = raw[f.name]
            expected = type(f.default)
            if expected is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, expected) or isinstance(value, bool):
                raise CheckpointError(f"malformed config: {f.name} should be {expected.__name__}, got {value!r}")
            if not 0 < value < math.inf:
                raise CheckpointError(f"malformed config: {f.name} must be positive and finite, got {value!r}")
            values[f.name] = value
    return config_cls(**values)


def _refuse_unimplemented(raw: dict) -> None:
    """Multimodal settings the official code would honour and this project does not implement: an error,
    never a silent difference. LLaDA-V is released with the values accepted here."""
    merge = raw.get("mm_patch_merge_type", "flat")  # the official default when the key is absent
    if merge != "spatial_unpad":
        raise CheckpointError(f"unsupported mm_patch_merge_type {merge!r}: only LLaDA-V's 'spatial_unpad' is "
                              f"implemented (the official code uses 'flat' when the key is absent)")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(key, False) is not False:
            raise CheckpointError(f"{key} {raw[key]!r} is not supported: the official loader would add tokens "
                                  f"with untrained embeddings; LLaDA-V is released with {key} false")


def _optional_length(raw: dict, key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise CheckpointError(f"malformed config: {key} should be a positive integer or null, got {value!r}")
    return value


def _parse_pinpoints(raw, tile: int) -> tuple[tuple[int, int], ...]:
    if raw is None:
        return default_grid_pinpoints(tile)
    if isinstance(raw, str):  # LLaVA-OneVision's "(1x1),...,(6x6)"
        ranges = re.findall(r"\((\d+)x(\d+)\)", raw)
        if len(ranges) != 2:
            raise CheckpointError(f"cannot parse image_grid_pinpoints {raw!r}")
        (a0, b0), (a1, b1) = [(int(a), int(b)) for a, b in ranges]
        pinpoints = [(tile * a, tile * b) for a in range(a0, a1 + 1) for b in range(b0, b1 + 1)]
    elif isinstance(raw, list) and all(isinstance(p, list) and len(p) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in p) for p in raw):
        pinpoints = [(w, h) for w, h in raw]
    else:
        raise CheckpointError(f"malformed config: image_grid_pinpoints must be a list of [width, height] integer "
                              f"pairs or a '(1x1),...,(6x6)' range, got {raw!r}")
    if not pinpoints or any(w < tile or h < tile or w % tile or h % tile for w, h in pinpoints):
        raise CheckpointError(f"image_grid_pinpoints must be a non-empty list of positive multiples of the tile "
                              f"size {tile}, got {raw!r}")
    return tuple(pinpoints)


def tiny_config(vocab_size: int) -> LladaVConfig:
    """The shipped model's sizes: LLaDA-V's structure, a few MB."""
    # 32 px patches: 2x2 = 4 tokens per 64 px tile keeps the demo model trainable on a CPU (benchmarks/demo_model).
    vision = VisionConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                          image_size=64, patch_size=32)
    language = LanguageConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                              max_position_embeddings=2048)
    return LladaVConfig(language=language, vision=vision, image_grid_pinpoints=default_grid_pinpoints(64))
