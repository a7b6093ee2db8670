"""LLaVA's `mlp2x_gelu` projector: vision features -> language embeddings, per tile."""

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """features [N, T, C_vision] -> embeddings [N, T, C_language]."""

    def __init__(self, vision_hidden: int, language_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, language_hidden)
        self.linear_2 = nn.Linear(language_hidden, language_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(F.gelu(self.linear_1(features)))
