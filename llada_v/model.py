"""LladaV: the vision tower, the projector, the denoiser and the `image_newline` vector."""

import torch
from torch import nn

from .config import LladaVConfig
from .denoiser import Denoiser
from .projector import Projector
from .vision_tower import VisionTower


class LladaV(nn.Module):
    def __init__(self, cfg: LladaVConfig):
        super().__init__()
        self.config = cfg
        self.denoiser = Denoiser(cfg.language)
        if cfg.has_vision:
            self.vision_tower = VisionTower(cfg.vision)
            self.projector = Projector(cfg.vision.hidden_size, cfg.language.hidden_size)
            self.image_newline = nn.Parameter(torch.zeros(cfg.language.hidden_size))

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> projected tile embeddings [N, T, C_language]."""
        if not self.config.has_vision:
            raise ValueError("this checkpoint is a text-only LLaDA model: it cannot take images")
        return self.projector(self.vision_tower(pixel_values))
