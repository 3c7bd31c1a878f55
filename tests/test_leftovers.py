"""Nothing left behind after a failure or a stop: SIGTERM is handled like Ctrl-C (every cleanup runs, exit 143), and a
run that fails before it has anything to resume from leaves its output folder as it was.

SIGTERM left 1,037 files in `.OUT.*.partial` after an export, and a `drivesim train` that failed before its first
step left config-<stage>.yaml, history.jsonl and an empty checkpoints/ (the rollout's cases are in test_rollout.py,
next to its tiny stack).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import write_synthetic_dataset


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")


def test_sigterm_during_export_leaves_nothing(tmp_path):
    ds = write_synthetic_dataset(tmp_path / "ds", clips=8, frames=60, size=(128, 256)).root
    out = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-m", "drivesim.cli.main", "export", str(ds), "--format", "yolo", "--out",
                             str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(tmp_path.glob(".exp.*.partial/images/*/*.png"))) >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the export finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .exp.*.partial, no exp


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", clips=1, frames=4, size=(32, 64)).root


def _train(ds: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "autoencoder", "--preset", "tiny", "--data", str(ds), "--out", str(run), "--no-progress", *extra]


def test_train_that_fails_before_its_first_step_leaves_no_run_folder(small_ds, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(_train(small_ds, run, "--batch-size", "64")) == 1  # 4 frames: fewer than one batch
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not run.exists()  # was: config-autoencoder.yaml and history.jsonl
    # a folder that was there keeps what it held, and its records get their earlier bytes back
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "history.jsonl").write_text('{"event": "start", "step": 0}\n')
    (run / "config-autoencoder.yaml").write_text("# an earlier attempt\n")
    assert main(_train(small_ds, run, "--batch-size", "64")) == 1
    assert sorted(p.name for p in run.iterdir()) == ["config-autoencoder.yaml", "history.jsonl", "notes.txt"]
    assert (run / "history.jsonl").read_text() == '{"event": "start", "step": 0}\n'
    assert (run / "config-autoencoder.yaml").read_text() == "# an earlier attempt\n"


def test_train_whose_first_checkpoint_hits_a_full_disk_leaves_no_run_folder(small_ds, tmp_path, monkeypatch,
                                                                           capsys):
    import drivesim.training.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(_train(small_ds, run, "--batch-size", "2", "--max-steps", "1")) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not run.exists()  # was: config-autoencoder.yaml, history.jsonl and an empty checkpoints/


def test_a_failed_run_with_something_to_resume_is_kept_whole(tmp_path):
    from drivesim.pipeline.outputs import undo_unless_resumable

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "history.jsonl").write_text("a\n")
    with pytest.raises(KeyboardInterrupt), undo_unless_resumable(folder, lambda: True, ["history.jsonl"]):
        (folder / "history.jsonl").write_text("a\nb\n")
        (folder / "checkpoints").mkdir()
        raise KeyboardInterrupt
    assert (folder / "history.jsonl").read_text() == "a\nb\n" and (folder / "checkpoints").is_dir()
    with pytest.raises(KeyboardInterrupt), undo_unless_resumable(folder, lambda: False, ["history.jsonl"]):
        (folder / "history.jsonl").write_text("c\n")
        (folder / "logs").mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "history.jsonl"]
    assert (folder / "history.jsonl").read_text() == "a\nb\n"
