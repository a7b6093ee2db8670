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


@pytest.fixture(scope="session")
def released_llada(tmp_path_factory) -> Path:
    """A tiny checkpoint in the released layout of the text-only LLaDA models (tests/released_llada_layout.py)."""
    import released_llada_layout

    return released_llada_layout.write_checkpoint(tmp_path_factory.mktemp("released-llada") / "checkpoint")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # On 2 shared cores torch's OpenMP threads spin-wait and slow the tests' tiny ops about 20x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory):
    """fp32 engines of the shipped model, built once per test session."""
    from exporter.build import build_engines

    return build_engines(None, tmp_path_factory.mktemp("engines") / "fp32", "fp32", progress=False)


@pytest.fixture(scope="session")
def no_eot_model_dir(tmp_path_factory):
    """The shipped model made never to answer <|eot_id|>: one channel of the residual stream is kept out of every
    layer's writes (its rows of o_proj and down_proj zeroed) and every token embedding gets +2 on it, so at every
    answer position it is positive into the final norm, whose weight on it is positive; eot's lm_head row reads
    only that channel, strongly negatively (the mirror of test_pipeline's always-eot model), so no early exit can
    happen, whatever numerics the loops use."""
    folder = tmp_path_factory.mktemp("no-eot")
    model = llada_v.load_model(llada_v.SHIPPED_MODEL_DIR)
    eot = llada_v.SpecialTokens.from_tokenizer(llada_v.load_tokenizer(llada_v.SHIPPED_MODEL_DIR)).eot
    channel = int(model.denoiser.norm.weight.argmax())
    with torch.no_grad():
        for layer in model.denoiser.layers:
            layer.self_attn.o_proj.weight[channel] = 0.0
            layer.mlp.down_proj.weight[channel] = 0.0
        model.denoiser.embed_tokens.weight[:, channel] += 2.0
        model.denoiser.lm_head.weight[eot] = 0.0
        model.denoiser.lm_head.weight[eot, channel] = -1000.0
    llada_v.save_model(model, folder, tokenizer_folder=llada_v.SHIPPED_MODEL_DIR)
    return folder


@pytest.fixture(scope="session")
def interrupted_while_importing():
    """run(command): start a Python CLI, send it SIGINT once it is importing torch (its libraries mapped in /proc),
    and return its exit status and stderr."""
    import signal
    import subprocess
    import sys
    import time

    def run(command: list[str]) -> tuple[int, str]:
        process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                maps = Path(f"/proc/{process.pid}/maps").read_text()
            except OSError:
                maps = ""
            if "libtorch" in maps:
                process.send_signal(signal.SIGINT)
                break
            time.sleep(0.005)
        else:
            process.kill()
            raise AssertionError(f"{command} never imported torch: {process.communicate()[1]}")
        return process.wait(60), process.stderr.read()

    return run
