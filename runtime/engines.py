"""Reading an engines folder (docs/engines.md): the manifest, its checks, config and embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llada_v import CheckpointError, LladaVConfig

FORMAT_VERSION = 2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BUILD_HINT = "rebuild it with `python -m exporter build --out DIR`"


@dataclass(frozen=True)
class EnginesFolder:
    folder: Path
    manifest: dict
    config: LladaVConfig
    dtype: torch.dtype

    @property
    def max_sequence_length(self) -> int:
        return int(self.manifest["max_sequence_length"])

    def part_file(self, part: str, kind: str) -> Path | None:
        """The part's model ("onnx") or TensorRT engine ("plan"); None when the manifest names none."""
        name = self.manifest["parts"][part].get(kind)
        return None if name is None else self.folder / name

    def load_embeddings(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embed_tokens [V, C] and image_newline [C] (None for a text-only model), on `device`."""
        from safetensors import safe_open

        path = self.folder / self.manifest.get("embeddings", "embeddings.safetensors")
        try:
            with safe_open(path, "pt", device="cpu") as f:
                names = set(f.keys())
                table = f.get_tensor("embed_tokens")
                newline = f.get_tensor("image_newline") if "image_newline" in names else None
        except (OSError, RuntimeError, KeyError) as err:
            raise ValueError(f"cannot read the embeddings of {self.folder} from {path.name} ({err}): {BUILD_HINT}") from err
        if self.config.has_vision and newline is None:
            raise ValueError(f"{path} lacks image_newline, which a multimodal model needs: {BUILD_HINT}")
        to = dict(device=device, dtype=self.dtype)
        return table.to(**to), None if newline is None else newline.to(**to)


def open_engines(folder: str | Path) -> EnginesFolder:
    """Check that `folder` is a complete engines folder of this format and read its manifest and config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"engines folder {folder} does not exist: build one with `python -m exporter build --out {folder}`")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{folder} has no manifest.json: it is not an engines folder, or its build did not finish; "
                         f"{BUILD_HINT}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}): {BUILD_HINT}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} must hold a JSON object: {BUILD_HINT}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{folder} has engines format_version {version!r}, this runtime reads version "
                         f"{FORMAT_VERSION}: {BUILD_HINT} with this version of the project")
    for key in ("precision", "parts", "max_sequence_length"):
        if key not in manifest:
            raise ValueError(f"{manifest_path} lacks {key!r}: {BUILD_HINT}")
    if manifest["precision"] not in DTYPES:
        raise ValueError(f"{manifest_path} has unknown precision {manifest['precision']!r} (expected fp32 or fp16)")
    listed = [f for entry in manifest["parts"].values() for f in entry.get("files", [])]
    listed += [manifest.get("embeddings", "embeddings.safetensors"), "config.json", "tokenizer.json"]
    missing = sorted({f for f in listed if not (folder / f).is_file()})
    if missing:
        raise ValueError(f"{folder} is incomplete: missing {', '.join(missing)} (listed in its manifest); "
                         f"the build was interrupted or files were removed: {BUILD_HINT}")
    try:
        config = LladaVConfig.from_file(folder / "config.json")
    except CheckpointError as err:
        raise ValueError(f"{folder}: {err}") from err
    needed = ["denoiser_full", "denoiser_cached"] + (["vision", "projector"] if config.has_vision else [])
    absent = [p for p in needed if p not in manifest["parts"]]
    if absent:
        raise ValueError(f"{manifest_path} lists no {', '.join(absent)} part: {BUILD_HINT}")
    return EnginesFolder(folder, manifest, config, DTYPES[manifest["precision"]])
