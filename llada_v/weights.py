"""Checkpoint folders in the released LLaDA-V layout, or in the text-only LLaDA layout (llada_layout.py):
config.json, safetensors (one file or shards with an index) and tokenizer files. Loading is strict: every
tensor is mapped to a parameter or explicitly dropped, every parameter is filled, every shape matches."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import llada_layout
from .config import LLADA, CheckpointError, LladaVConfig, read_config_json
from .model import LladaV
from .tokenizer import SpecialTokens, load_tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_VISION = "model.vision_tower.vision_tower.vision_model."

# LLaDA-V's (checkpoint prefix, module prefix); first match wins.
KEY_MAP = (
    ("model.embed_tokens.", "denoiser.embed_tokens."),
    ("model.layers.", "denoiser.layers."),
    ("model.norm.", "denoiser.norm."),
    ("lm_head.", "denoiser.lm_head."),
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    (_VISION, "vision_tower."),
    ("model.image_newline", "image_newline"),
)
# Tensors the released checkpoint carries that LLaDA-V never runs.
DROPPED = (_VISION + "post_layernorm.", _VISION + "head.")
# One row per vocabulary entry: cut to the tokenizer's length on load (see checkpoint_config).
VOCABULARY_ROWS = ("denoiser.embed_tokens.weight", "denoiser.lm_head.weight")


def to_module_key(key: str, cfg: LladaVConfig) -> str | None:
    """Checkpoint tensor name -> parameter name, None when dropped. Raises KeyError when unknown."""
    if cfg.family == LLADA:
        return llada_layout.to_module_key(key)
    if key.startswith(DROPPED):
        return None
    layer = re.match(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.", key)
    if layer and cfg.vision is not None and int(layer.group(1)) >= cfg.vision.num_hidden_layers:
        return None  # the SigLIP layer LLaDA-V drops, if the checkpoint kept it
    for ckpt_prefix, module_prefix in KEY_MAP:
        if key.startswith(ckpt_prefix):
            return module_prefix + key[len(ckpt_prefix):]
    raise KeyError(key)


def to_checkpoint_key(name: str, cfg: LladaVConfig) -> str:
    if cfg.family == LLADA:
        return llada_layout.to_checkpoint_key(name)
    for ckpt_prefix, module_prefix in KEY_MAP:
        if name.startswith(module_prefix):
            return ckpt_prefix + name[len(module_prefix):]
    raise KeyError(name)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when the checkpoint is sharded)."""
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{folder / INDEX_FILE} is malformed ({err!r})") from err
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{folder / INDEX_FILE} is malformed: weight_map must map tensor names to shard "
                                  f"file names")
        for shard in set(weight_map.values()):
            inside_folder(folder, shard, INDEX_FILE)
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{folder} lacks shards listed in its index: {missing}")
        return {name: folder / f for name, f in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        try:
            with safe_open(folder / SINGLE_FILE, "pt") as f:
                return {name: folder / SINGLE_FILE for name in f.keys()}
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"cannot read {folder / SINGLE_FILE}: {err}") from err
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: not a checkpoint folder")


def inside_folder(folder: Path, name: str, listed_in: str) -> Path:
    """folder / name for a file name that a folder's own index or manifest lists; CheckpointError unless it is a
    plain name that resolves inside the folder (no absolute path, no `..`, no symlink out)."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", "..") or \
            not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder / listed_in} names {name!r}, which is not a file inside {folder}: "
                              f"every file it lists must be a plain file name in the same folder")
    return path


def check_layer_counts(keys, cfg: LladaVConfig, folder: Path) -> None:
    """The config's layer counts against the tensors' names, before any module is built (a config that
    claims millions of layers must fail at once, not after building them)."""
    llada = cfg.family == LLADA
    prefix = llada_layout.LAYER_PREFIX if llada else r"model\.layers\.(\d+)\."
    layer_indices = {int(m.group(1)) for key in keys if (m := re.match(prefix, key))}
    stored = max(layer_indices, default=-1) + 1
    if stored != cfg.language.num_hidden_layers:
        raise CheckpointError(f"{folder}: config.json says {'n_layers' if llada else 'num_hidden_layers'} "
                              f"{cfg.language.num_hidden_layers}, the checkpoint holds {stored} language layers")
    if cfg.vision is not None:
        vision = {int(m.group(1)) for key in keys
                  if (m := re.match(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.", key))}
        stored = max(vision, default=-1) + 1
        # The released checkpoint keeps the SigLIP layer LLaDA-V drops.
        if stored not in (cfg.vision.num_hidden_layers, cfg.vision.num_hidden_layers + 1):
            raise CheckpointError(f"{folder}: config.json implies {cfg.vision.num_hidden_layers} vision layers "
                                  f"that run, the checkpoint holds {stored}")


def checkpoint_config(folder: str | Path) -> LladaVConfig:
    """The config of the model a checkpoint folder runs as: config.json, with, when the folder has a tokenizer,
    a LLaDA-V vocabulary cut to the tokenizer's length, as LLaDA-V's loader does
    (`model.resize_token_embeddings(len(tokenizer))`, llava/model/builder.py:303): the checkpoint's
    padding rows (126,464 - 126,349 in LLaDA-V) are never predicted. The LLaDA family keeps every row, as
    its official code does (it loads the model with AutoModel.from_pretrained and never resizes it)."""
    folder = Path(folder)
    raw = read_config_json(folder / "config.json")
    cfg = LladaVConfig.from_dict(raw)
    if not (folder / "tokenizer.json").is_file():
        return cfg
    tokenizer = load_tokenizer(folder)
    rows = len(tokenizer)
    stored = cfg.language.vocab_size
    if rows > stored:
        key = "embedding_size" if cfg.family == LLADA else "vocab_size"
        raise CheckpointError(f"{folder}: the tokenizer has {rows} tokens but the model's vocabulary only {stored} "
                              f"rows ({key} in config.json): the tokenizer belongs to another model")
    if cfg.family == LLADA:
        _check_token_ids(raw, tokenizer, folder)
        return cfg
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, vocab_size=rows))


def _check_token_ids(raw: dict, tokenizer, folder: Path) -> None:
    """The token ids a LLaDA config.json names, against its tokenizer's tokens. The official code never reads
    them from the config (generate.py takes mask_id=126336 as an argument, chat.py strips 126081), so ids that
    disagree with the tokenizer mean a config and a tokenizer of different models."""
    special, names = SpecialTokens.from_tokenizer(tokenizer), SpecialTokens.NAMES
    for key, token, token_id in (("mask_token_id", names["mask"], special.mask),
                                 ("eos_token_id", names["eos"], special.eos),
                                 ("pad_token_id", "pad token", tokenizer.pad_token_id)):
        if key in raw and raw[key] != token_id:
            raise CheckpointError(f"{folder / 'config.json'} says {key} {raw[key]!r}, but the tokenizer's {token} is "
                                  f"{token_id}: the config and the tokenizer belong to different models")


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LladaV:
    """Build LladaV from a checkpoint folder (LLaDA-V, its language tower alone, or a text-only LLaDA model),
    with the vocabulary checkpoint_config gives it."""
    reader = CheckpointReader(folder)
    reader.check()
    model = reader.meta_model()
    model.load_state_dict(reader.read(lambda name: True, dtype, device), strict=True, assign=True)
    return model.eval()


STREAMED_EMBEDDING = "denoiser.embed_tokens"


def load_model_streaming(folder: str | Path, dtype: torch.dtype = torch.float32,
                         on_load: Callable[[str, nn.Module], None] | None = None) -> LladaV:
    """LladaV of a checkpoint folder that holds its large weights only while they run: each transformer layer
    (the denoiser's and the vision encoder's) and the vocabulary head is read from the safetensors when it is
    called and dropped (back to the meta device) when it returns, and the token embedding reads only the rows
    it is asked for. The norms, the projector and the vision embeddings are loaded as by load_model. Memory:
    those and one layer or the head; each call of the model reads every layer again, so it suits a few calls
    (the exporter's reference outputs), not decoding. The checkpoint is assumed checked (load_model raises
    for it).

    on_load(prefix, module): called once the resident weights are in (with "" and the model, whose streamed
    modules are still on the meta device) and whenever a layer or the head has been read (with its module
    name and the module), e.g. to replace weights the exporter quantized with their dequantized values."""
    reader = CheckpointReader(folder)
    model = reader.meta_model()
    streamed = {name: module for name, module in model.named_modules()
                if re.fullmatch(r".*\.layers\.\d+|denoiser\.lm_head", name)}

    def is_streamed(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in (*streamed, STREAMED_EMBEDDING))

    resident = reader.read(lambda name: not is_streamed(name), dtype, "cpu")
    model.load_state_dict(resident, strict=False, assign=True)
    if on_load is not None:
        on_load("", model)
    for prefix, module in streamed.items():
        def load(module, args, prefix=prefix):
            state = reader.read(lambda name: name.startswith(prefix + "."), dtype, "cpu")
            module.load_state_dict({name[len(prefix) + 1:]: t for name, t in state.items()}, strict=True, assign=True)
            if on_load is not None:
                on_load(prefix, module)

        def drop(module, args, output):
            module.to("meta")
            release_freed_memory(collect=False)

        module.register_forward_pre_hook(load)
        module.register_forward_hook(drop)

    embedding = model.get_submodule(STREAMED_EMBEDDING)
    full_table = embedding.weight = nn.Parameter(embedding.weight.to(dtype), requires_grad=False)  # meta: no data

    def read_rows(module, args):
        """Only the rows of the ids asked for, as a table of its own that the ids are renumbered into."""
        (ids,) = args
        rows, renumbered = torch.unique(ids, return_inverse=True)
        module.weight = nn.Parameter(reader.rows(f"{STREAMED_EMBEDDING}.weight", rows, dtype), requires_grad=False)
        return (renumbered,)

    def drop_rows(module, args, output):
        module.weight = full_table
        release_freed_memory(collect=False)

    embedding.register_forward_pre_hook(read_rows)
    embedding.register_forward_hook(drop_rows)
    return model.eval()


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (unless `collect` is False: a module just dropped is freed by its reference count) and
    give the heap's free pages back to the OS (glibc's malloc_trim). glibc keeps freed
    blocks below its mmap threshold (which grows to 32 MB) in the process: without the trim, every layer read
    and dropped would leave its attention weights resident, and one build step's temporaries would still be there
    when the next makes its large allocations (README, Measured choices)."""
    if collect:
        gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class CheckpointReader:
    """A checkpoint's tensors by module name, in the shapes its config implies (vocabulary rows cut), read
    from the safetensors files when asked for (the exporter reads one tensor at a time)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        self.folder = folder
        stored_vocab = LladaVConfig.from_file(folder / "config.json").language.vocab_size
        self.cfg = checkpoint_config(folder)
        files = checkpoint_files(folder)
        check_layer_counts(files, self.cfg, folder)
        with torch.device("meta"):
            self.shapes = {name: p.shape for name, p in LladaV(self.cfg).named_parameters()}
        self.stored_shapes = {name: (stored_vocab, *self.shapes[name][1:]) for name in VOCABULARY_ROWS
                              if name in self.shapes}
        # module name -> (file, checkpoint key), worked out once: the streaming model reads a layer per call
        self.locations: dict[str, tuple[Path, str]] = {}
        self.unexpected: list[str] = []  # checkpoint keys that map to no module
        for key, path in files.items():
            try:
                name = to_module_key(key, self.cfg)
            except KeyError:
                self.unexpected.append(key)
                continue
            if name is not None:
                self.locations[name] = path, key

    def meta_model(self) -> LladaV:
        with torch.device("meta"):
            return LladaV(self.cfg)

    def check(self) -> None:
        """CheckpointError unless the tensors are exactly the config's parameters, in its shapes (read from
        the files' headers only)."""
        missing = [to_checkpoint_key(n, self.cfg) for n in self.shapes if n not in self.locations]
        extra = [key for name, (_, key) in self.locations.items() if name not in self.shapes]
        unexpected = self.unexpected + extra
        if missing or unexpected:
            raise CheckpointError(f"{self.folder} does not match its config.json: missing tensors {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                                  f"{' ...' if len(unexpected) > 8 else ''}")
        self.read(lambda name: True, None, "meta")

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor by its module name, e.g. `denoiser.layers.0.mlp.up_proj.weight`."""
        return self.read(lambda n: n == name, dtype, "cpu")[name]

    def rows(self, name: str, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of a 2-D tensor by their indices (e.g. a few token embeddings), read one at a time, so that
        memory holds only them."""
        path, key = self.locations[name]
        try:
            with safe_open(path, "pt", device="cpu") as f:
                table = f.get_slice(key)
                return torch.cat([table[i:i + 1] for i in indices.tolist()]).to(dtype)
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err

    def read(self, wanted, dtype: torch.dtype | None, device) -> dict[str, torch.Tensor]:
        """The tensors whose module names `wanted` accepts; on the meta device only their shapes are checked."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, (path, key) in self.locations.items():
            if wanted(name):
                by_file.setdefault(path, []).append((name, key))
        state = {}
        for path, names in by_file.items():
            try:
                with safe_open(path, "pt", device="cpu") as f:
                    for name, key in names:
                        tensor = f.get_slice(key)
                        shape = tuple(tensor.get_shape())
                        implied = tuple(self.stored_shapes.get(name, self.shapes.get(name, shape)))
                        if shape != implied:
                            raise CheckpointError(f"{key} in {path.name} has shape {shape}, the config implies "
                                                  f"{implied}")
                        if torch.device(device).type == "meta":
                            continue
                        tensor = tensor[:self.cfg.language.vocab_size] if name in self.stored_shapes else tensor[:]
                        state[name] = tensor.to(device=device, dtype=dtype)
            except (OSError, SafetensorError) as err:
                raise CheckpointError(f"cannot read {path}: {err}") from err
        return state


def save_model(model: LladaV, folder: str | Path, tokenizer_folder: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> None:
    """Write a checkpoint folder in its family's released layout: one safetensors file, or shards and an
    index when the tensors exceed `max_shard_bytes`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "config.json")
    save_tensors(((to_checkpoint_key(name, model.config), (p.detach().to(dtype) if dtype else p.detach()).cpu())
                  for name, p in model.named_parameters()), folder, max_shard_bytes)
    if tokenizer_folder is not None:
        copy_tokenizer(tokenizer_folder, folder)


def save_tensors(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int | None = None) -> int:
    """(checkpoint key, tensor) pairs into `folder` in the released layout, one shard in memory at a time:
    model.safetensors, or, once they exceed max_shard_bytes, model-0000i-of-0000N.safetensors and their
    index (shards are written under temporary names until N is known). Returns the tensors' bytes."""
    shard_keys: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    for key, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shard and shard_bytes + size > max_shard_bytes:
            _save_shard(shard, folder, shard_keys)
            shard_bytes = 0
        shard[key] = tensor.contiguous()
        shard_bytes += size
        total += size
    _save_shard(shard, folder, shard_keys)
    if len(shard_keys) == 1:
        (folder / ".shard-0.tmp").rename(folder / SINGLE_FILE)
        return total
    weight_map = {}
    for i, keys in enumerate(shard_keys):
        name = f"model-{i + 1:05d}-of-{len(shard_keys):05d}.safetensors"
        (folder / f".shard-{i}.tmp").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def _save_shard(shard: dict[str, torch.Tensor], folder: Path, shard_keys: list[list[str]]) -> None:
    save_file(shard, folder / f".shard-{len(shard_keys)}.tmp", metadata={"format": "pt"})
    shard_keys.append(list(shard))
    shard.clear()


def copy_tokenizer(source: str | Path, destination: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(destination) / name)
