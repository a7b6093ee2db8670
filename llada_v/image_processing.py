"""LLaDA-V's image path around the vision tower (LLaVA-OneVision `anyres_max_N`, `spatial_unpad`).

Before: pick the best tile grid for the image, resize keeping the aspect ratio, pad, cut into tiles
and put a global view first. After the projector: lay the grid tiles out as one feature map, cut
the padding away, shrink it when it holds more than N tiles' worth, end every row with
`image_newline`, and put the global view's embeddings first.
(Mirrors llava/mm_utils.py and llava_arch.py of LLaVA-NeXT, which LLaDA-V uses.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import LladaVConfig

MEAN = STD = 0.5  # SigLIP's normalisation, per channel


@dataclass(frozen=True)
class ImageTiles:
    pixel_values: torch.Tensor  # [1 + cols * rows, 3, S, S] float32, global view first, grid row-major
    image_size: tuple[int, int]  # original (width, height)
    grid: tuple[int, int]  # (cols, rows)


def load_image(image) -> Image.Image:
    """A path, PIL image or RGB uint8 array [H, W, 3] -> RGB PIL image; ValueError when unusable."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except FileNotFoundError as err:
            raise ValueError(f"image file {image} does not exist") from err
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {image}: not a readable image file ({err})") from err
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"an image array must be RGB with shape [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (0..255), got {image.dtype}")
        return Image.fromarray(image, "RGB")
    raise ValueError(f"an image must be a path, a PIL image or an RGB uint8 array, got {type(image).__name__}")


def select_best_resolution(image_size: tuple[int, int], candidates) -> tuple[int, int]:
    """The (width, height) that keeps the most of the image's resolution, then wastes the least."""
    width, height = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    target_w, target_h = target
    width, height = image.size
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def normalize(tile: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0)
    return ((pixels - MEAN) / STD).permute(2, 0, 1)


def preprocess(image, cfg: LladaVConfig) -> ImageTiles:
    if cfg.vision is None:
        raise ValueError("this model is text-only: it cannot take images")
    image = load_image(image)
    tile = cfg.vision.image_size
    best_w, best_h = select_best_resolution(image.size, cfg.image_grid_pinpoints)
    padded = resize_and_pad(image, (best_w, best_h))
    tiles = [image.resize((tile, tile), Image.Resampling.BICUBIC)]
    tiles += [padded.crop((x, y, x + tile, y + tile)) for y in range(0, best_h, tile) for x in range(0, best_w, tile)]
    return ImageTiles(torch.stack([normalize(t) for t in tiles]), image.size, (best_w // tile, best_h // tile))


def unpad(features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """features [C, H, W] of the padded grid -> the part that covers the image."""
    width, height = image_size
    cur_h, cur_w = features.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        return features[:, pad:cur_h - pad, :]
    new_w = int(width * (cur_h / height))
    pad = (cur_w - new_w) // 2
    return features[:, :, pad:cur_w - pad]


def merge_tile_embeddings(tile_embeddings: torch.Tensor, tiles: ImageTiles, image_newline: torch.Tensor,
                          cfg: LladaVConfig) -> torch.Tensor:
    """tile_embeddings [1 + cols * rows, T, C] -> the image's embeddings [M, C] for the prompt."""
    side = cfg.vision.patches_per_side
    cols, rows = tiles.grid
    if tile_embeddings.shape[0] != 1 + cols * rows:
        raise ValueError(f"expected {1 + cols * rows} tile embeddings for a {cols}x{rows} grid, got {tile_embeddings.shape[0]}")
    global_view, grid = tile_embeddings[0], tile_embeddings[1:]
    channels = grid.shape[-1]
    grid = grid.reshape(rows, cols, side, side, channels).permute(4, 0, 2, 1, 3).reshape(channels, rows * side, cols * side)
    grid = unpad(grid, tiles.image_size)
    height, width = grid.shape[1:]
    times = math.sqrt(height * width / (cfg.max_tiles_before_shrink * side**2))
    if times > 1.1:
        grid = F.interpolate(grid[None].float(), [int(height // times), int(width // times)], mode="bilinear")[0]
        grid = grid.to(tile_embeddings.dtype)
    newline = image_newline.to(grid.dtype)[:, None, None].expand(channels, grid.shape[1], 1)
    grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((global_view, grid), dim=0)
