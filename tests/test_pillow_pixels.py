"""Our preprocessing gives the pixels of the official environment's Pillow 10.3.0 under the installed Pillow.

Forty cases (docs/fidelity.md, Pillow versions): noise, a smooth gradient, RGBA with a transparent top half
and a palette image, at five sizes, through `anyres` (one image) and `pad` (each of several images). The
expected pixels are SHA-256 digests of our preprocessing under Pillow 10.3.0, which the script checks against
the official transcription (official_llada_v.py) under that Pillow: equal, but for the palette images padded
to squares, which we convert to RGB first (a deliberate deviation, docs/fidelity.md). Made once by running
this file as a script with that Pillow first on the path:

    pip download --no-deps pillow==10.3.0 -d /tmp/w && unzip -q /tmp/w/pillow-10.3.0-*.whl -d /tmp/pil103
    PYTHONPATH=/tmp/pil103:tests python tests/test_pillow_pixels.py   # writes tests/pillow_10_3_pixels.json

Inputs come from integer arithmetic, not an RNG or a quantizer, so they are the same under every numpy and
Pillow.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llada_v import LladaVConfig
from llada_v.image_processing import preprocess

EXPECTED_FILE = Path(__file__).with_name("pillow_10_3_pixels.json")
KINDS = ("noise", "gradient", "rgba", "palette")
SIZES = ((384, 384), (1024, 768), (300, 1200), (100, 80), (640, 480))
ASPECTS = ("anyres", "pad")
CASES = [f"{kind} {w}x{h} {aspect}" for kind in KINDS for w, h in SIZES for aspect in ASPECTS]


def _hashed(count: int, seed: int) -> np.ndarray:
    """`count` bytes from a fixed integer hash (splitmix-like), the same on every machine."""
    x = np.arange(count, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    return (x >> np.uint64(56)).astype(np.uint8)


def case_image(kind: str, width: int, height: int) -> Image.Image:
    if kind == "gradient":
        xs, ys = np.meshgrid(np.arange(width), np.arange(height))
        pixels = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1),
                           (xs + ys) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")
    if kind == "palette":
        image = Image.fromarray(_hashed(width * height, 3).reshape(height, width) % 16, "P")
        image.putpalette(_hashed(16 * 3, 4).tolist())
        return image
    pixels = _hashed(width * height * 4, 1 if kind == "noise" else 2).reshape(height, width, 4)
    if kind == "noise":
        return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB")
    pixels[: height // 2, :, 3] = 0  # transparent top half: black once resized with premultiplied alpha
    return Image.fromarray(pixels, "RGBA")


def digest(pixel_values: torch.Tensor) -> str:
    """SHA-256 of the 8-bit pixels behind normalised tiles (x / 255 - 0.5) / 0.5."""
    levels = torch.round((pixel_values.float() * 0.5 + 0.5) * 255).to(torch.uint8)
    return hashlib.sha256(levels.contiguous().numpy().tobytes()).hexdigest()


def _parse(case: str) -> tuple[Image.Image, str]:
    kind, size, aspect = case.split()
    width, height = map(int, size.split("x"))
    return case_image(kind, width, height), aspect


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    return json.loads(EXPECTED_FILE.read_text())


@pytest.mark.parametrize("case", CASES)
def test_pixels_equal_pillow_10_3(expected, case):
    image, aspect = _parse(case)
    assert digest(preprocess(image, LladaVConfig(), aspect).pixel_values) == expected[case]


def test_the_cases_include_a_view_later_pillows_resize_otherwise():
    # 300x1200 -> 384x384 (the global view): Pillow 13 runs this resize vertically first.
    image = case_image("noise", 300, 1200)
    two_pass = image.resize((384, 1200), Image.Resampling.BICUBIC).resize((384, 384), Image.Resampling.BICUBIC)
    vertical_first = image.resize((300, 384), Image.Resampling.BICUBIC).resize((384, 384), Image.Resampling.BICUBIC)
    assert not np.array_equal(np.asarray(two_pass), np.asarray(vertical_first))


def _reference_digests() -> dict[str, str]:
    """Our digests, each checked against the official transcription's where we follow it."""
    import official_llada_v as official

    cfg = LladaVConfig()
    processor = official.SigLipImageProcessor(cfg.vision.image_size)
    digests = {}
    for case in CASES:
        image, aspect = _parse(case)
        digests[case] = digest(preprocess(image, cfg, aspect).pixel_values)
        if case.startswith("palette") and aspect == "pad":
            continue  # expand2square loses the palette: we convert to RGB first (docs/fidelity.md)
        # The official code takes "pad" for each image of a request with several: two, the second a dummy.
        images = [image] if aspect == "anyres" else [image, case_image("gradient", 8, 8)]
        pixels = official.process_images(images, processor, cfg)[0]
        if digest(pixels if aspect == "anyres" else pixels[None]) != digests[case]:
            raise SystemExit(f"{case}: our pixels differ from the official transcription's under this Pillow")
    return digests


if __name__ == "__main__":
    import PIL

    if PIL.__version__ != "10.3.0":
        sys.exit(f"run this with Pillow 10.3.0 (the official environment's) first on the path, not {PIL.__version__}")
    EXPECTED_FILE.write_text(json.dumps(_reference_digests(), indent=1) + "\n")
    print(f"wrote {len(CASES)} digests to {EXPECTED_FILE}")
