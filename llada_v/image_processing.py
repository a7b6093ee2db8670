"""LLaDA-V's image path around the vision tower (LLaVA-OneVision `anyres_max_N`, `spatial_unpad`).

Before: pick the best tile grid for the image, resize keeping the aspect ratio, pad, cut into tiles
and put a global view first; or, for each image of a request with several, pad it to a square and
take that one view ("pad"). Resizing happens in the image's own mode, RGB conversion last.
After the projector: lay the grid tiles out as one feature map, cut the padding away, shrink it when
it holds more than N tiles' worth, end every row with `image_newline`, and put the global view's
embeddings first (a "pad" view gives its tokens alone).
(Mirrors llava/mm_utils.py and llava_arch.py of LLaVA-NeXT, which LLaDA-V uses.)
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import LladaVConfig

MEAN = STD = 0.5  # SigLIP's normalisation, per channel
# Refused before decoding: a guard against decompression bombs that arrays and PIL images obey too.
# 64 MP is 12x what the largest grid (6x6 tiles of 384) keeps of an image.
MAX_IMAGE_PIXELS = 64 * 2**20


# Several images in one request are each padded to a square of this colour and seen as one tile, as the
# official evaluation does (image_aspect_ratio "pad"): int(255 * mean) per channel (mm_utils.py:301-313, 332).
PAD_BACKGROUND = (127, 127, 127)
# Modes the official "pad" path handles as intended; others are converted to RGB first (fidelity.md).
PAD_MODES = ("RGB", "RGBA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageTiles:
    pixel_values: torch.Tensor  # [1 + cols * rows, 3, S, S] float32, global view first, grid row-major
    image_size: tuple[int, int]  # original (width, height)
    grid: tuple[int, int] | None  # (cols, rows); None for a padded square view alone ("pad")


class ImageTooLargeError(ValueError):
    """The image has more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or a photo to downscale)."""


def load_image(image) -> Image.Image:
    """A path, encoded image bytes, PIL image or RGB uint8 array [H, W, 3] -> PIL image, upright, in its
    own mode (the official code resizes before converting to RGB, which decides how transparency and
    palettes look); ValueError when unusable or larger than MAX_IMAGE_PIXELS."""
    if isinstance(image, (str, Path, bytes, bytearray)):
        name = f"image {image}" if isinstance(image, (str, Path)) else f"the {len(image)} bytes given as an image"
        try:
            with Image.open(image if isinstance(image, (str, Path)) else io.BytesIO(image)) as opened:
                _check_pixels(opened, name)
                opened.load()
                return _upright_8bit(opened)
        except FileNotFoundError as err:
            raise ValueError(f"image file {image} does not exist") from err
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(f"{name} is too large to decode ({err}); at most {MAX_IMAGE_PIXELS} pixels") from err
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read {name}: not a readable image file ({err})") from err
    if isinstance(image, Image.Image):
        _check_pixels(image, "the PIL image")
        return _upright_8bit(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"an image array must be RGB with shape [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 (0..255), got {image.dtype}")
        image = Image.fromarray(image, "RGB")
        _check_pixels(image, "the image array")
        return image
    raise ValueError(f"an image must be a path, encoded bytes, a PIL image or an RGB uint8 array, "
                     f"got {type(image).__name__}")


def _check_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{name} has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{name} has {width}x{height} = {width * height} pixels, more than the {MAX_IMAGE_PIXELS} "
                         f"allowed: downscale it first (the model sees at most 6x6 tiles anyway)")


def _upright_8bit(image: Image.Image) -> Image.Image:
    """Two deliberate deviations from the official code, which would show the model another picture than
    every viewer does: the EXIF orientation is applied, and 16-bit grayscale is scaled to 8 bits (PIL's
    own conversion clips it, so the image turns white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), "L")
    return image


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


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow's default filter, as the official `image.resize(size)` calls get it: nearest for
    bilevel and palette images, bicubic otherwise (RGBA is resampled with premultiplied alpha)."""
    if image.mode in ("1", "P"):
        return image.resize(size, Image.Resampling.NEAREST)
    return bicubic(image, size)


# Image.resize resamples these with premultiplied alpha.
PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}


def bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Image.resize(size, BICUBIC) as Pillow 10.3, the official environment's, computes it under every Pillow:
    a horizontal pass, then a vertical one, the first rounded to 8 bits. Pillow 12.1 shrinks images more than
    100x taller than wide vertically first, and 13.0 chooses the order by the scale factors (vertically first
    for 300x1200 -> 384x384), so the 8-bit intermediate rounds otherwise (docs/fidelity.md, Pillow versions).
    A pass along one axis alone is the same in all of them."""
    if image.size == tuple(size):
        return image.copy()  # as Image.resize: no premultiplied round trip
    work = image.convert(PREMULTIPLIED[image.mode]) if image.mode in PREMULTIPLIED else image
    width, height = size
    if width != work.width:
        work = work.resize((width, work.height), Image.Resampling.BICUBIC)
    if height != work.height:
        work = work.resize((width, height), Image.Resampling.BICUBIC)
    return work.convert(image.mode) if image.mode in PREMULTIPLIED else work


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resized in its own mode, pasted onto a black RGB canvas (Pillow converts it, dropping alpha)."""
    target_w, target_h = target
    width, height = image.size
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resize(image, (new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def check_padded_square(size: tuple[int, int], name: str = "an image") -> None:
    """ImageTooLargeError when padding an image of `size` to a square (several images in a request) would make
    more than MAX_IMAGE_PIXELS: a 1x100000 image is legal, its square is not."""
    side = max(size)
    if side * side > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"{name} of {size[0]}x{size[1]} pixels would be padded to a {side}x{side} square "
                                 f"({side * side} pixels, more than the {MAX_IMAGE_PIXELS} allowed): with several "
                                 f"images in a request each is padded to a square; crop or downscale it")


def expand_to_square(image: Image.Image) -> Image.Image:
    """The official `expand2square`: the image centred on a PAD_BACKGROUND square of its longer side."""
    check_padded_square(image.size)
    if image.mode not in PAD_MODES:
        image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), PAD_BACKGROUND)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def normalize(tile: Image.Image) -> torch.Tensor:
    """The SigLIP processor: RGB last, then scale 1/255 and mean = std = 0.5."""
    pixels = torch.from_numpy(np.asarray(tile.convert("RGB"), dtype=np.float32) / 255.0)
    return ((pixels - MEAN) / STD).permute(2, 0, 1)


def preprocess(image, cfg: LladaVConfig, aspect: str = "anyres") -> ImageTiles:
    """One image -> its tiles. aspect "anyres": a global view and the best grid of tiles (one image in a
    request); "pad": one padded square view (each image of a request with several, as the official code)."""
    if cfg.vision is None:
        raise ValueError("this model is text-only: it cannot take images")
    return tiles_of(load_image(image), cfg, aspect)


def tiles_of(image: Image.Image, cfg: LladaVConfig, aspect: str = "anyres") -> ImageTiles:
    """preprocess for an image load_image has already read."""
    tile = cfg.vision.image_size
    if aspect == "pad":
        # The processor converts to RGB before it resizes, with bicubic whatever the mode.
        square = bicubic(expand_to_square(image).convert("RGB"), (tile, tile))
        return ImageTiles(normalize(square)[None], image.size, None)
    best_w, best_h = select_best_resolution(image.size, cfg.image_grid_pinpoints)
    padded = resize_and_pad(image, (best_w, best_h))
    tiles = [resize(image, (tile, tile))]
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
    """tile_embeddings [1 + cols * rows, T, C] -> the image's embeddings [M, C] for the prompt; a padded
    square view alone ("pad") gives its T embeddings, with no image_newline (llava_arch.py:516)."""
    if tiles.grid is None:
        if tile_embeddings.shape[0] != 1:
            raise ValueError(f"expected 1 tile embedding for a padded image, got {tile_embeddings.shape[0]}")
        return tile_embeddings[0]
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
