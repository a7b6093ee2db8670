"""Shared fixtures: the shipped model and the real model's reference files."""

import os
from pathlib import Path

import torch

# Triton decides at `@triton.jit` definition time whether to interpret, so this must precede any
# import of triton (torch._dynamo and torch.export import it too). Without a GPU the kernel tests
# run in the interpreter; the runtime still uses the PyTorch references on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llada_v

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llada-8b"


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    return llada_v.SHIPPED_MODEL_DIR


@pytest.fixture(scope="session")
def shipped_model(shipped_model_dir) -> llada_v.LladaV:
    return llada_v.load_model(shipped_model_dir)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "config.json").is_file():
        pytest.skip(f"the real LLaDA-8B reference files are not at {REFERENCE_DIR} (../shared beside the repo)")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
