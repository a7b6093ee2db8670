"""`python -m exporter build`: bad input gives one line and exit code 2, a failed build exit code 1,
and neither leaves anything behind; --force replaces only an engines folder, only after a successful
build; concurrent and killed builds, unwritable output folders and Ctrl-C are handled."""

import errno
import fcntl
import json
import os
import re
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
from runtime.backends.engines import open_engines

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


def _engines_folder(folder: Path) -> Path:
    """A folder the exporter takes for an engines folder: it has a manifest.json."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "denoiser.onnx").write_text("previous build")
    return folder


def _tree(root: Path) -> dict[str, str]:
    """Every path under root: a file's text, a link's target, "/" for a folder (links are not followed)."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for path in (Path(folder, name) for name in dirs + files):
            content = os.readlink(path) if path.is_symlink() else path.read_text() if path.is_file() else "/"
            tree[str(path.relative_to(root))] = content
    return tree


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
    for text in ("--precision {fp32,fp16,int8,int4}", "MatMulNBits", "./engines", "shipped", "exit codes", "validation", "'.[gpu]'"):
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


@pytest.mark.parametrize("engines, message", [(False, "is not empty and not an engines folder"),
                                              (True, "already holds engines: use --force")],
                         ids=["user-files", "engines"])
def test_non_empty_out_without_force_is_refused(tmp_path, run_main, engines, message):
    if engines:
        _engines_folder(tmp_path / "engines")
    else:
        (tmp_path / "engines").mkdir()
        (tmp_path / "engines" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    code, err = run_main("--out", tmp_path / "engines")
    assert code == 2
    assert message in _one_line_error(err)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("out, message", [
    ("mine", "is not empty and not an engines folder"),
    (".", "is the current folder or one above it"),
    ("..", "is the current folder or one above it"),
    ("", "argument --out: is empty (an unset variable?)"),
], ids=["user-folder", "dot", "dot-dot", "empty"])
def test_force_replaces_nothing_but_engines(tmp_path, run_main, monkeypatch, out, message):
    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "mine" / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    code, err = run_main("--out", out, "--force")
    assert code == 2
    assert message in _one_line_error(err)
    assert _tree(tmp_path) == before


def _out_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt" / "engines"


def _out_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt"


def _out_is_a_link(tmp_path):
    _engines_folder(tmp_path / "real")
    (tmp_path / "engines").symlink_to(tmp_path / "real")
    return tmp_path / "engines"


@pytest.mark.parametrize("make_out, message", [
    (_out_under_a_file, "notes.txt, which is a file"),
    (_out_is_a_file, "exists and is not a folder"),
    (_out_is_a_link, "is a symbolic link"),
], ids=["under-a-file", "a-file", "a-symlink"])
def test_out_that_is_no_folder_is_refused(tmp_path, run_main, make_out, message):
    out = make_out(tmp_path)
    before = _tree(tmp_path)
    code, err = run_main("--out", out, "--force")
    assert code == 2
    assert message in _one_line_error(err)
    assert _tree(tmp_path) == before


def test_read_only_parent_is_one_line_and_exit_2(tmp_path, run_main, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root: chmod does not stop its writes, so folders there fail as they would
        mkdir = Path.mkdir

        def refused(self, *args, **kwargs):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", refused)
    try:
        code, err = run_main("--out", parent / "engines")
    finally:
        parent.chmod(0o755)
    assert code == 2
    assert "Permission denied" in _one_line_error(err)
    assert _tree(tmp_path) == {"read-only": "/"}


@pytest.mark.parametrize("existing", [True, False], ids=["replacing-engines", "new-nested-folder"])
def test_disk_full_is_one_line_and_exit_2(tmp_path, run_main, monkeypatch, existing):
    out = _engines_folder(tmp_path / "engines") if existing else tmp_path / "new" / "nested" / "engines"
    before = _tree(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(exporter.build, "save_file", disk_full)
    code, err = run_main("--precision", "fp32", "--out", out, "--force")
    assert code == 2
    line = _one_line_error(err)
    assert "No space left on device" in line and "free some space or choose another --out" in line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_folder_that_appears_during_the_build_is_kept(tmp_path, run_main, monkeypatch, force):
    out = tmp_path / "engines"
    hash_weights = exporter.build.checkpoint_sha256

    def user_writes_out_meanwhile(model_dir):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return hash_weights(model_dir)
    monkeypatch.setattr(exporter.build, "checkpoint_sha256", user_writes_out_meanwhile)
    code, err = run_main("--precision", "fp32", "--out", out, *(["--force"] if force else []))
    assert code == 2
    line = _one_line_error(err)
    assert "changed during the build, so the new engines were discarded" in line
    assert "not an engines folder" in line
    assert _tree(tmp_path) == {"engines": "/", "engines/notes.txt": "mine"}


def test_second_build_into_the_same_out_is_refused(tmp_path, run_main):
    out = _engines_folder(tmp_path / "engines")
    with open(tmp_path / ".engines.lock", "w") as lock:  # what a running build holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = _tree(tmp_path)
        code, err = run_main("--precision", "fp32", "--out", out, "--force")
    assert code == 2
    assert f"another build into {out} is running" in _one_line_error(err)
    assert _tree(tmp_path) == before


def test_build_restores_engines_a_killed_build_left_moved_aside(tmp_path, run_main):
    moved_aside = _engines_folder(tmp_path / ".engines.old")  # killed between the publish step's renames
    before = _tree(moved_aside)
    code, err = run_main("--out", tmp_path / "engines")
    notice, error = err.strip().splitlines()
    assert notice == f"restored {tmp_path / 'engines'} from {moved_aside}, where a killed build had moved it"
    assert code == 2 and "already holds engines: use --force" in error
    assert _tree(tmp_path / "engines") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_build_removes_previous_engines_a_killed_build_left(tmp_path, run_main):
    out = _engines_folder(tmp_path / "engines")  # killed after the publish step's renames
    moved_aside = _engines_folder(tmp_path / ".engines.old")
    before = _tree(out)
    code, err = run_main("--out", out)
    notice, error = err.strip().splitlines()
    assert notice == f"removed {moved_aside}, the previous engines a killed build had already replaced"
    assert code == 2 and "already holds engines: use --force" in error
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_loading_reports_engines_a_killed_build_left_moved_aside(tmp_path):
    moved_aside = _engines_folder(tmp_path / ".engines.old")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"\.engines\.old holds the engines a build moved aside before it was killed"):
        open_engines(tmp_path / "engines")
    with pytest.raises(ValueError, match=f"mv {moved_aside} {tmp_path / 'engines'}"):
        open_engines(tmp_path / "engines")
    assert _tree(tmp_path) == before


def test_build_removes_staging_folders_of_gone_processes(tmp_path, run_main):
    gone = tmp_path / ".engines.building-4194305-abcdef"  # above Linux's largest pid_max: no such process
    alive = tmp_path / f".engines.building-{os.getppid()}-abcdef"
    for staging in (gone, alive):
        staging.mkdir()
        (staging / "denoiser.onnx_data").write_text("gigabytes")
    code, err = run_main("--precision", "fp32", "--out", tmp_path / "engines")
    assert code == 0
    assert err.strip().splitlines() == [f"removed {gone}, left by build process 4194305, which is gone"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "engines"]


def test_out_cannot_replace_the_checkpoint(tmp_path, run_main):
    checkpoint = _checkpoint_copy(tmp_path)
    code, err = run_main("--model", checkpoint, "--out", checkpoint, "--force")
    assert code == 2
    assert "would replace the checkpoint" in _one_line_error(err)
    assert (checkpoint / "model.safetensors").is_file()


@pytest.mark.skipif(unavailable_reason() is None, reason="this machine can build TensorRT engines")
def test_tensorrt_without_gpu_fails_before_exporting(tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(exporter.build, "trace_part", lambda *a, **k: pytest.fail("exported before failing"))
    code, err = run_main("--backend", "tensorrt", "--out", tmp_path / "engines")
    assert code == 2
    line = _one_line_error(err)
    assert "NVIDIA GPU" in line and "tensorrt" in line and "pip install '.[gpu]'" in line
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_exits_1_and_keeps_the_old_folder(tmp_path, run_main, monkeypatch):
    old = _engines_folder(tmp_path / "engines")
    before = _tree(tmp_path)
    monkeypatch.setitem(exporter.validate.REL_TOL, "fp32", 0.0)
    code, err = run_main("--precision", "fp32", "--out", old, "--force")
    assert code == 1
    assert "vision failed validation against PyTorch: max error" in _one_line_error(err)
    assert _tree(tmp_path) == before


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(exporter.build, "check_part", interrupt)
    with pytest.raises(KeyboardInterrupt):
        exporter.build.build_engines(None, tmp_path / "engines", "fp32", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_importing_is_one_line(interrupted_while_importing, tmp_path):
    status, stderr = interrupted_while_importing(["-m", "exporter", "build", "--out", str(tmp_path / "engines")])
    assert (status, stderr) == (130, "error: interrupted: nothing was written\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure, exit_code, message", [
    (KeyboardInterrupt, 130, "interrupted: nothing was written"),
    (MemoryError, 2, "ran out of memory building the engines of .*GB of memory.*nothing was written"),
])
def test_a_build_stopped_midway_exits_with_one_line_and_keeps_the_old_folder(tmp_path, run_main, monkeypatch,
                                                                             failure, exit_code, message):
    old = _engines_folder(tmp_path / "engines")
    before = _tree(tmp_path)

    def stop(*args, **kwargs):
        raise failure
    monkeypatch.setattr(exporter.build, "reference_cases", stop)
    code, err = run_main("--precision", "fp16", "--out", old, "--force")
    assert code == exit_code
    assert re.fullmatch(f"error: {message}", _one_line_error(err))
    assert _tree(tmp_path) == before


def test_force_replaces_the_folder_after_a_successful_build(tmp_path, run_main):
    out = _engines_folder(tmp_path / "engines")
    (out / "stale.onnx").write_text("old")
    code, err = run_main("--precision", "fp32", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "stale.onnx").exists()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


@pytest.mark.parametrize("force", [False, True])
def test_an_empty_out_is_replaced(tmp_path, run_main, force):
    out = tmp_path / "engines"
    out.mkdir()
    code, err = run_main("--precision", "fp32", "--out", out, *(["--force"] if force else []))
    assert code == 0, err
    assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_defaults_are_the_shipped_model_fp16_onnx_and_engines_here(tmp_path, monkeypatch):
    seen = {}

    def stop(model_dir, out_dir, precision, backend):
        seen.update(model_dir=model_dir, out_dir=out_dir, precision=precision, backend=backend)
        raise exporter.build.BuildError("stopped by the test")

    monkeypatch.setattr(exporter.build, "_check_request", stop)
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--quiet"]) == 2
    assert seen == {"model_dir": llada_v.SHIPPED_MODEL_DIR, "out_dir": tmp_path / "engines",
                    "precision": "fp16", "backend": "onnx"}


def test_not_enough_disk_is_refused_before_anything_is_written(tmp_path, run_main, monkeypatch):
    import exporter.build

    real = exporter.build.shutil.disk_usage
    monkeypatch.setattr(exporter.build.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    code, err = run_main("--precision", "fp32", "--out", tmp_path / "deep" / "engines")
    assert code == 2
    assert "the build needs about" in err and "GB are free: free some space or choose another --out" in err
    assert list(tmp_path.iterdir()) == []

