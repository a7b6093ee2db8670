"""What the benchmark commands share: requests, pipeline loading, machine facts."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from benchmarks.demo_model.data import load_examples, prompt_text
from benchmarks.demo_model.evaluate import is_exact_match, token_f1
from exporter.manifest import checkpoint_sha256
from llada_v import SHIPPED_MODEL_DIR
from llada_v.weights import checkpoint_files


@dataclass(frozen=True)
class Request:
    prompt: str
    image: Image.Image | None
    answer: str | None
    kind: str  # the question type (benchmarks/demo_model/data.py)

    def is_correct(self, text: str) -> bool:
        return is_exact_match(text, self.answer)

    def f1(self, text: str) -> float:
        return token_f1(text, self.answer)


def token_agreement(tokens: list[int], baseline: list[int]) -> float:
    """Share of positions (over the longer answer) where the two answers hold the same token."""
    length = max(len(tokens), len(baseline))
    return 1.0 if length == 0 else sum(a == b for a, b in zip(tokens, baseline)) / length


def load_requests(count: int, with_answers: bool, with_images: bool = True) -> list[Request]:
    """The first `count` questions of the demo task's held-out split, with their images (without: the questions
    alone, for a text-only model)."""
    examples = load_examples("eval", limit=count)
    return [Request(prompt_text(ex.question), ex.image, ex.answer if with_answers else None, ex.kind) if with_images
            else Request(ex.question, None, ex.answer if with_answers else None, ex.kind) for ex in examples]


def run_interleaved(pipes: dict, requests: list[Request], config, warmup: int) -> dict[str, list]:
    """Every request through every pipeline, request by request, pipeline by pipeline (so a slow spell of the
    machine hits all of them alike); returns each pipeline's results after the first `warmup` requests."""
    from tqdm import tqdm

    results = {name: [] for name in pipes}
    with tqdm(total=len(requests) * len(pipes), desc="requests", unit="req") as progress:
        for i, request in enumerate(requests):
            for name, pipe in pipes.items():
                result = pipe.generate(request.prompt, image=request.image, config=config)
                progress.update()
                if i >= warmup:
                    results[name].append(result)
    return results


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N for every backend run (default: cuda for tensorrt, else cpu)")


def load_pipeline(path: Path, backend: str, device: str | None = None):
    from runtime import Pipeline

    return Pipeline.load(path, backend=backend, device=device)


def source_sha256(folder: Path) -> str | None:
    """The checkpoint behind a folder: an engines folder's source (its manifest), or a checkpoint folder's own."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("source", {}).get("sha256")
    try:
        return checkpoint_sha256(folder)
    except (OSError, ValueError):
        return None


def is_shipped_model(folder: Path) -> bool:
    """Whether a folder holds the shipped model or engines built from it: its labelled set is the demo task.

    A checkpoint folder is hashed only when its weight files have the shipped model's sizes: hashing every
    checkpoint would read all of an 8B model's 16 GB to say no."""
    if not (folder / "manifest.json").is_file() and _weight_sizes(folder) != _weight_sizes(SHIPPED_MODEL_DIR):
        return False
    return source_sha256(folder) == checkpoint_sha256(SHIPPED_MODEL_DIR)


def _weight_sizes(folder: Path) -> list[int] | None:
    try:
        return sorted(path.stat().st_size for path in set(checkpoint_files(folder).values()))
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": f"{cpu} x{os.cpu_count()}", "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
