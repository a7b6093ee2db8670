"""`python -m exporter build`: bad input gives one line and exit code 2, a failed build exit code 1,
and neither leaves anything behind; --force replaces a folder only after a successful build."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import exporter.build
import exporter.validate
import llada_v
from exporter.__main__ import main
from exporter.trt_build import unavailable_reason

REPO = Path(__file__).resolve().parents[1]


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def run_main(capsys):
    """The CLI in-process (faster than a subprocess): exit code and the stderr line."""
    def run(*args):
        try:
            code = main(["build", "--quiet", *map(str, args)])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        return code, capsys.readouterr().err
    return run


def _checkpoint_copy(tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(llada_v.SHIPPED_MODEL_DIR, folder)
    return folder


def test_unknown_precision_is_one_line_and_exit_2(tmp_path):
    result = _cli(["build", "--precision", "fp8"], cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'fp8'" in _one_line_error(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder_is_one_line_and_exit_2(tmp_path):
    result = _cli(["build", "--precision", "fp16", "--model", "no/such/checkpoint"], cwd=tmp_path)
    assert result.returncode == 2
    assert "no/such/checkpoint does not exist" in _one_line_error(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_help_documents_defaults_and_exit_codes(tmp_path):
    result = _cli(["build", "--help"], cwd=tmp_path)
    assert result.returncode == 0
    for text in ("--precision {fp32,fp16}", "./engines", "shipped", "exit codes", "validation", "'.[gpu]'"):
        assert text in result.stdout


@pytest.mark.parametrize("damage, message", [
    (lambda ckpt: (ckpt / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda ckpt: (ckpt / "config.json").write_text(json.dumps({"hidden_size": "big"})), "malformed config"),
    (lambda ckpt: (ckpt / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda ckpt: (ckpt / "model.safetensors").write_bytes(b"\x08" + bytes(100)), "cannot read"),
    (lambda ckpt: (ckpt / "tokenizer.json").unlink(), "has no tokenizer.json"),
], ids=["config-not-json", "config-bad-field", "no-safetensors", "corrupt-safetensors", "no-tokenizer"])
def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, run_main, damage, message):
    checkpoint = _checkpoint_copy(tmp_path)
    damage(checkpoint)
    code, err = run_main("--model", checkpoint, "--out", tmp_path / "engines")
    assert code == 2
    assert message in _one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_unknown_precision_through_the_python_api(tmp_path):
    with pytest.raises(exporter.build.BuildError, match="unknown precision 'bf16'"):
        exporter.build.build_engines(None, tmp_path / "engines", precision="bf16")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_out_without_force_is_refused(tmp_path, run_main):
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "keep.txt").write_text("mine")
    code, err = run_main("--out", tmp_path / "engines")
    assert code == 2
    assert "not empty: use --force" in _one_line_error(err)
    assert [p.name for p in (tmp_path / "engines").iterdir()] == ["keep.txt"]


def test_out_cannot_replace_the_checkpoint(tmp_path, run_main):
    checkpoint = _checkpoint_copy(tmp_path)
    code, err = run_main("--model", checkpoint, "--out", checkpoint, "--force")
    assert code == 2
    assert "would replace the checkpoint" in _one_line_error(err)
    assert (checkpoint / "model.safetensors").is_file()


@pytest.mark.skipif(unavailable_reason() is None, reason="this machine can build TensorRT engines")
def test_tensorrt_without_gpu_fails_before_exporting(tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(exporter.build, "export_part", lambda *a, **k: pytest.fail("exported before failing"))
    code, err = run_main("--backend", "tensorrt", "--out", tmp_path / "engines")
    assert code == 2
    line = _one_line_error(err)
    assert "NVIDIA GPU" in line and "tensorrt" in line and "pip install '.[gpu]'" in line
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_exits_1_and_keeps_the_old_folder(tmp_path, run_main, monkeypatch):
    old = tmp_path / "engines"
    old.mkdir()
    (old / "keep.txt").write_text("previous build")
    monkeypatch.setitem(exporter.validate.REL_TOL, "fp32", 0.0)
    code, err = run_main("--precision", "fp32", "--out", old, "--force")
    assert code == 1
    assert "vision failed validation against PyTorch: max error" in _one_line_error(err)
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(exporter.build, "validate_part", interrupt)
    with pytest.raises(KeyboardInterrupt):
        exporter.build.build_engines(None, tmp_path / "engines", "fp32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_the_folder_after_a_successful_build(tmp_path, run_main):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    code, err = run_main("--precision", "fp32", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "stale.onnx").exists()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_defaults_are_the_shipped_model_fp16_onnx_and_engines_here(tmp_path, monkeypatch):
    seen = {}

    def stop(model_dir, out_dir, precision, backend, force):
        seen.update(model_dir=model_dir, out_dir=out_dir, precision=precision, backend=backend, force=force)
        raise exporter.build.BuildError("stopped by the test")

    monkeypatch.setattr(exporter.build, "_check_request", stop)
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--quiet"]) == 2
    assert seen == {"model_dir": llada_v.SHIPPED_MODEL_DIR, "out_dir": tmp_path / "engines",
                    "precision": "fp16", "backend": "onnx", "force": False}
