"""Shared fixtures: the shipped model and the real model's reference files."""

from pathlib import Path

import pytest
import torch

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
