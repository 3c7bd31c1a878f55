"""Every writer in datasets/ and eval/ on a full disk: one WriteError naming the file, nothing half-written left.

The failures are real: each writer runs in a child process whose file-size limit (RLIMIT_FSIZE, no root needed)
makes writes past a few KiB fail with EFBIG inside the library doing the writing (PyAV, HDF5, OpenCV, json,
safetensors), as a full disk does with ENOSPC.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
from pathlib import Path

import numpy as np

from drivesim.errors import WriteError

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
frames = rng.integers(0, 255, (12, 64, 128, 3), dtype=np.uint8)


def video():
    from drivesim.datasets.clips import write_video
    write_video(out / "clip.mp4", frames, 10.0)


def annotation_json():
    from drivesim.datasets.clips import write_json_atomic
    write_json_atomic(out / "clip.json", {"frames": ["x" * 100] * 200})


def preview_png():
    from drivesim.datasets.preview import _write_png
    _write_png(out / "preview.png", frames[0])


def latent_cache():
    from drivesim.bbox_conditioning.boxes import pack_boxes
    from drivesim.datasets.latent_cache import LatentCacheWriter
    with LatentCacheWriter(out / "latents.h5", "id", dtype="float32") as w:
        for i in range(4):
            w.add_clip(f"c{i}", rng.standard_normal((12, 4, 8, 16)), pack_boxes([[]] * 12, 128, 64, 16), night=0,
                       crowdedness=0, fps=10.0, split="train", width=128, height=64)


def day_night():
    from drivesim.eval.day_night import FEATURES, DayNightClassifier
    DayNightClassifier(np.ones(len(FEATURES) * 40), 0.5).save(out / "day_night.json")


def report():
    from drivesim.eval.report import build_report
    spec = {"dataset": sys.argv[2], "split": None, "clips": None, "label": "real", "max_clips": 1}
    build_report([], [spec], out / "report.html")


results = {}
for name, fn in [("video", video), ("annotation_json", annotation_json), ("preview_png", preview_png),
                 ("latent_cache", latent_cache), ("day_night", day_night), ("report", report)]:
    try:
        fn()
        results[name] = ["ok", ""]
    except WriteError as e:
        results[name] = ["WriteError", str(e)]
    except BaseException as e:
        results[name] = [type(e).__name__, str(e)]
print(json.dumps(results))
"""

EXPECTED = {"video": "clip.mp4", "annotation_json": "clip.json", "preview_png": "preview.png",
            "latent_cache": "latents.h5", "day_night": "day_night.json", "report": "report.html"}


def _limit_file_size() -> None:  # runs in the child
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_every_writer_on_a_full_disk(tmp_path_factory):
    from drivesim.datasets.clips import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path_factory.mktemp("src") / "ds", clips=1, frames=4, size=(32, 64)).root
    tmp_path = tmp_path_factory.mktemp("out")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(data)], env=env, capture_output=True,
                         text=True, timeout=300, preexec_fn=_limit_file_size)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.strip() == "", run.stderr[-3000:]  # no library error spam (HDF5, FFmpeg)
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, file in EXPECTED.items():
        kind, message = results[name]
        assert kind == "WriteError", (name, kind, message)
        assert message == f"{tmp_path / file}: write: File too large; nothing was written", (name, message)
        assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no temp files, no partial outputs


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_rollout_on_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path):
    # the rollout's state (safetensors: SafetensorError), latents (np.save) and state.json writes leaked
    # tracebacks and left their temp files; what it committed before stays resumable
    from drivesim.datasets.clips import Box
    from drivesim.datasets.scenario import Scenario, save_scenario

    from drivesim.rollout import init_checkpoint_dir

    init_checkpoint_dir(tmp_path / "ckpt", "tiny", seed=0)
    frames = [[Box("1", "car", 5 + k, 10, 25 + k, 26)] for k in range(12)]
    save_scenario(Scenario(fps=10.0, width=64, height=32, night=0, crowdedness=1, frames=frames), tmp_path / "s.json")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "drivesim.cli.main", "rollout", "--scenario", str(tmp_path / "s.json"),
            "--ckpt-dir", str(tmp_path / "ckpt"), "--frames", "12", "--out", str(out), "--quiet", "--set", "steps=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1, run.stderr[-3000:]
    # numpy words a short write its own way ("1536 requested and 718 written")
    assert re.fullmatch(rf"error: {re.escape(str(out))}/\S+: write: .+; nothing was written", lines[0]), lines[0]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], sorted(out.rglob("*"))
