"""manifest.json of an engines folder: what each part is, how it was checked, where it came from.

Layout (docs/engines.md): format_version, precision, family, source {checkpoint, sha256}, limits,
embeddings, parts {name: files, onnx, plan?, inputs, outputs, profiles}, validation {name: ...}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llada_v.weights import INDEX_FILE, checkpoint_files

from .engines_format import EMBEDDINGS_FILE, FORMAT_VERSION, MANIFEST_FILE, EngineLimits
from .onnx_export import PartSpec
from .profiles import Profiles


@dataclass
class PartEntry:
    spec: PartSpec
    files: list[str]  # every file the part needs, its .onnx first (external data may be another part's)
    profiles: Profiles  # the ranges of the part's symbolic dimensions, per optimization profile
    plan: str | None = None  # TensorRT engine, backend tensorrt only

    def to_dict(self) -> dict:
        entry = {"files": self.files + ([self.plan] if self.plan else []), "onnx": self.files[0]}
        if self.plan:
            entry["plan"] = self.plan
        entry["inputs"] = [t.to_dict() for t in self.spec.inputs]
        entry["outputs"] = [t.to_dict() for t in self.spec.outputs]
        entry["profiles"] = {profile: {name: asdict(dims[name]) for name in self.spec.dims}
                             for profile, dims in self.profiles.items()}
        return entry


@dataclass
class Manifest:
    precision: str
    family: str  # LladaVConfig.family: "llada_v" or "llada" (the text-only LLaDA models)
    checkpoint: Path
    limits: EngineLimits
    checkpoint_sha256: str = ""  # filled in last: hashing a real checkpoint's weights takes a while
    parts: dict[str, PartEntry] = field(default_factory=dict)
    validation: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "precision": self.precision, "family": self.family,
                "source": {"checkpoint": str(self.checkpoint), "sha256": self.checkpoint_sha256},
                "limits": self.limits.to_dict(), "embeddings": EMBEDDINGS_FILE,
                "parts": {name: part.to_dict() for name, part in self.parts.items()},
                "validation": self.validation}

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_manifest(folder: str | Path) -> dict:
    """The manifest of an engines folder, checked for the format version this code writes."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the folder with `python -m exporter build`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; this code reads "
                         f"{FORMAT_VERSION}: rebuild the engines")
    return manifest


def checkpoint_sha256(folder: Path) -> str:
    """sha256 over the checkpoint's weight files (and shard index), name and content, in name order."""
    files = set(checkpoint_files(folder).values())
    if (folder / INDEX_FILE).is_file():
        files.add(folder / INDEX_FILE)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
