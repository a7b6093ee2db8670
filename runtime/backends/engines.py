"""Reading an engines folder (docs/engines.md): the manifest, its checks, config and embeddings."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.engines_format import FORMAT_VERSION, PRECISION_DTYPES, EngineLimits, moved_aside, parts
from llada_v import CheckpointError, LladaVConfig
from llada_v.weights import inside_folder

DTYPES = {precision: getattr(torch, name) for precision, name in PRECISION_DTYPES.items()}
BUILD_HINT = "rebuild it with `python -m exporter build --out DIR`"


@dataclass(frozen=True)
class EnginesFolder:
    folder: Path
    manifest: dict
    config: LladaVConfig
    dtype: torch.dtype

    @property
    def limits(self) -> EngineLimits:
        """What one call of these engines may take (the build's --max-batch, --max-sequence, ...)."""
        return EngineLimits(**self.manifest["limits"])

    @property
    def max_tiles(self) -> int | None:
        """Tiles per vision call (None for a text-only model)."""
        if "vision" not in self.manifest["parts"]:
            return None
        return int(self.manifest["parts"]["vision"]["profiles"]["all"]["num_tiles"]["max"])

    def part_file(self, part: str, kind: str) -> Path | None:
        """The part's model ("onnx") or TensorRT engine ("plan"); None when the manifest names none."""
        name = self.manifest["parts"][part].get(kind)
        return None if name is None else self.folder / name

    def load_embeddings(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embed_tokens [V, C] in its stored dtype and image_newline [C] (None for a text-only model) in the
        engines' dtype, on `device`; their presence and shapes were checked by open_engines."""
        from safetensors import safe_open

        with safe_open(self.folder / self.manifest["embeddings"], "pt", device="cpu") as f:
            table = f.get_tensor("embed_tokens")
            newline = f.get_tensor("image_newline") if self.config.has_vision else None
        return table.to(device), None if newline is None else newline.to(device=device, dtype=self.dtype)


def open_engines(folder: str | Path) -> EnginesFolder:
    """Check that `folder` is a complete engines folder of this format, whose every file is inside it and
    agrees with its config.json, and read its manifest and config. Every backend opens its folder here, so
    no request ever starts on a folder that cannot serve it; ValueError says what is wrong."""
    folder = Path(folder)
    if not folder.is_dir() and (old := moved_aside(Path(os.path.abspath(folder)))).is_dir():
        raise ValueError(f"engines folder {folder} does not exist, but {old} holds the engines a build moved "
                         f"aside before it was killed: restore them with `mv {old} {folder}` (the next "
                         f"`python -m exporter build --out {folder}` does it too)")
    if not folder.is_dir():
        raise ValueError(f"engines folder {folder} does not exist: build one with `python -m exporter build --out {folder}`")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{folder} has no manifest.json: it is not an engines folder, or its build did not finish; "
                         f"{BUILD_HINT}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}): {BUILD_HINT}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} must hold a JSON object: {BUILD_HINT}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{folder} has engines format_version {version!r}, this runtime reads version "
                         f"{FORMAT_VERSION}: {BUILD_HINT} with this version of the project")
    _check_manifest(manifest, manifest_path)
    listed = [f for entry in manifest["parts"].values() for f in entry["files"]]
    listed += [manifest["embeddings"], "config.json", "tokenizer.json"]
    try:
        paths = {name: inside_folder(folder, name, "manifest.json") for name in listed}
        config = LladaVConfig.from_file(folder / "config.json")
    except CheckpointError as err:
        raise ValueError(f"{err}: {BUILD_HINT}") from err
    missing = sorted({name for name, path in paths.items() if not path.is_file()})
    if missing:
        raise ValueError(f"{folder} is incomplete: missing {', '.join(missing)} (listed in its manifest); "
                         f"the build was interrupted or files were removed: {BUILD_HINT}")
    needed = parts(config.has_vision)
    absent = [p for p in needed if p not in manifest["parts"]]
    if absent:
        raise ValueError(f"{manifest_path} lists no {', '.join(absent)} part: {BUILD_HINT}")
    engines = EnginesFolder(folder, manifest, config, DTYPES[manifest["precision"]])
    for part in needed:
        _check_graph(engines, part)
    _check_embeddings(engines)
    return engines


def _check_manifest(manifest: dict, path: Path) -> None:
    """The manifest's own shape: the keys the runtime reads, with the types it reads them as."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is malformed: {what}: {BUILD_HINT}")

    for key in ("precision", "parts", "limits"):
        if key not in manifest:
            raise bad(f"it lacks {key!r}")
    if manifest["precision"] not in DTYPES:
        raise bad(f"unknown precision {manifest['precision']!r} (expected one of {', '.join(DTYPES)})")
    try:
        EngineLimits(**manifest["limits"])
    except (TypeError, ValueError) as err:
        raise bad(f"limits {manifest['limits']!r} ({err})") from err
    manifest.setdefault("embeddings", "embeddings.safetensors")
    if not isinstance(manifest["embeddings"], str):
        raise bad(f"embeddings must be a file name, got {manifest['embeddings']!r}")
    parts = manifest["parts"]
    if not isinstance(parts, dict):
        raise bad(f"parts must be an object of part name -> entry, got a {type(parts).__name__}")
    for name, entry in parts.items():
        if not isinstance(entry, dict):
            raise bad(f"part {name!r} must be an object, got {entry!r}")
        files = entry.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise bad(f"part {name!r}: files must be a list of file names, got {files!r}")
        for kind in ("onnx", "plan"):
            if kind in entry and entry[kind] not in files:
                raise bad(f"part {name!r}: its {kind} file {entry[kind]!r} is not among its files")
        profiles = entry.get("profiles")
        if not isinstance(profiles, dict) or not profiles or not all(
                isinstance(dims, dict) and all(isinstance(r, dict) and isinstance(r.get("max"), int) for r in dims.values())
                for dims in profiles.values()):
            raise bad(f"part {name!r}: profiles must map each profile to its dimensions' ranges, got {profiles!r}")


def _graph_io(config: LladaVConfig, part: str) -> tuple[list[str], list[str]]:
    """The input and output names docs/engines.md gives each part."""
    layers = range(config.language.num_hidden_layers)
    presents = [f"present_keys.{i}" for i in layers] + [f"present_values.{i}" for i in layers]
    denoiser = ["inputs_embeds", "position_ids", "attention_mask", "logits_index"]
    return {"vision": (["pixel_values"], ["features"]), "projector": (["features"], ["embeddings"]),
            "denoiser": ([*denoiser, *[f"past_keys.{i}" for i in layers], *[f"past_values.{i}" for i in layers],
                          "past_mask"], ["logits", *presents]),
            }[part]


def _check_graph(engines: EnginesFolder, part: str) -> None:
    """The part's ONNX graph (not its weights): readable, the part the manifest says, of the engines'
    precision and of the sizes config.json gives."""
    import onnx

    path = engines.part_file(part, "onnx")
    if path is None:
        raise ValueError(f"{engines.folder}: the manifest names no onnx model for {part!r}: {BUILD_HINT}")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # protobuf's DecodeError and friends: the file is truncated or not ONNX
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}): {BUILD_HINT}") from err
    for tensor in _tensors(graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            try:
                inside_folder(engines.folder, location, path.name)
            except CheckpointError as err:
                raise ValueError(f"{err}: the weights of an engines folder stay inside it; {BUILD_HINT}") from err
    inputs, outputs = {v.name: v for v in graph.input}, {v.name: v for v in graph.output}
    want_inputs, want_outputs = _graph_io(engines.config, part)
    if set(inputs) != set(want_inputs) or set(outputs) != set(want_outputs):
        raise ValueError(f"{path} is not the {part} graph of a {engines.config.language.num_hidden_layers}-layer model "
                         f"(inputs {sorted(inputs)[:6]}, outputs {sorted(outputs)[:6]}): the folder's files were "
                         f"swapped or config.json was changed after the build; {BUILD_HINT}")
    cfg, precision = engines.config, engines.manifest["precision"]
    expected_dtype = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}[DTYPES[precision]]
    typed = outputs["features"] if part == "vision" else inputs["features" if part == "projector" else "inputs_embeds"]
    if typed.type.tensor_type.elem_type != expected_dtype:
        raise ValueError(f"{path} is not a {precision} graph though the manifest says precision {precision!r}: "
                         f"{BUILD_HINT}")
    if part == "vision":
        value, size = outputs["features"], cfg.vision.hidden_size
    elif part == "projector":
        value, size = outputs["embeddings"], cfg.language.hidden_size
    else:
        value, size = outputs["logits"], cfg.language.vocab_size
    last = value.type.tensor_type.shape.dim[-1]
    if last.HasField("dim_value") and last.dim_value != size:
        raise ValueError(f"{path} gives {value.name} of width {last.dim_value} but config.json implies {size}: "
                         f"config.json was changed after the build; {BUILD_HINT}")
    if part == "denoiser":
        hidden = inputs["inputs_embeds"].type.tensor_type.shape.dim[-1]
        if hidden.HasField("dim_value") and hidden.dim_value != cfg.language.hidden_size:
            raise ValueError(f"{path} takes inputs_embeds of width {hidden.dim_value} but config.json says "
                             f"hidden_size {cfg.language.hidden_size}: config.json was changed after the build; "
                             f"{BUILD_HINT}")


def _tensors(graph):
    """Every tensor a graph holds: its initializers and its nodes' tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def _check_embeddings(engines: EnginesFolder) -> None:
    """embeddings.safetensors: readable, with the tensors and shapes config.json implies (headers only)."""
    from safetensors import SafetensorError, safe_open

    path = engines.folder / engines.manifest["embeddings"]
    cfg = engines.config
    expected = {"embed_tokens": [cfg.language.vocab_size, cfg.language.hidden_size]}
    if cfg.has_vision:
        expected["image_newline"] = [cfg.language.hidden_size]
    try:
        with safe_open(path, "pt", device="cpu") as f:
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (OSError, SafetensorError) as err:
        raise ValueError(f"cannot read {path} ({err}): {BUILD_HINT}") from err
    for name, shape in expected.items():
        if shapes.get(name) != shape:
            raise ValueError(f"{path} holds {name} of shape {shapes.get(name)}, config.json implies {shape}: "
                             f"{BUILD_HINT}")
