"""`drivesim encode`: a tiny autoencoder fills the latent cache; scale factor computed and stored; bad flags."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from drivesim.cli.main import main
from drivesim.datasets.clips import load_clip, read_manifest, write_synthetic_dataset
from drivesim.datasets.latent_cache import LatentCache, encoder_id
from drivesim.datasets.transforms import frames_to_tensor

import drivesim
from drivesim.autoencoder import AutoencoderKL, compute_scale_factor
from drivesim.configs import get_preset
from drivesim.training.checkpoint import save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    write_synthetic_dataset(root / "data", clips=2, frames=4, size=(32, 64), splits=("train", "val"))
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny").autoencoder)
    save_model(AutoencoderKL(cfg), root / "ae")
    return root


def test_encode_fills_cache_with_posterior_means_and_stores_scale(setup):
    root = setup
    before = drivesim.load(root / "ae")
    assert before.config.scale_factor == 1.0
    rc = main(["encode", "--ae", str(root / "ae"), "--data", str(root / "data"), "--out", str(root / "c.h5"),
               "--dtype", "float32", "--batch-frames", "3"])
    assert rc == 0
    after = drivesim.load(root / "ae")
    entries = read_manifest(root / "data").clips
    train = [frames_to_tensor(load_clip(e)[0])[None] for e in entries if e.split == "train"]
    # computed from posterior means, what the cache holds: scaled cached train latents have unit std (it was
    # computed from posterior samples, which left the cached means at std ~0.9 on the sample data)
    expected_scale = compute_scale_factor(before, train, sample=False)
    assert after.config.scale_factor == pytest.approx(expected_scale, rel=1e-4)
    cache_train = np.concatenate([LatentCache(root / "c.h5").read_clip(e.clip_id)["latents"] for e in entries
                                  if e.split == "train"])
    assert float(np.std(cache_train.astype(np.float64) * after.config.scale_factor, ddof=1)) == pytest.approx(
        1.0, rel=1e-3)
    assert json.loads((root / "ae" / "config.json").read_text())["config"]["scale_factor"] == after.config.scale_factor
    cache = LatentCache(root / "c.h5", expected_encoder_id=encoder_id(*after.encoder_fingerprint()))
    assert cache.scale_factor == after.config.scale_factor
    for e in entries:
        with torch.no_grad():
            mean = after.encode(frames_to_tensor(load_clip(e)[0])[None]).mode()[0]
        np.testing.assert_allclose(cache.read_clip(e.clip_id)["latents"], mean.numpy(), atol=1e-5)


def test_encode_bad_flags(setup, capsys):
    root = setup
    assert main(["encode", "--ae", str(root / "ae"), "--data", str(root / "data"), "--out", str(root / "x.h5"),
                 "--size", "30x64"]) == 1
    assert "--size" in capsys.readouterr().err
    assert main(["encode", "--ae", str(root / "nope"), "--data", str(root / "data"), "--out",
                 str(root / "x.h5")]) == 1
    assert not (root / "x.h5").exists()


def _file_size_limit(nbytes: int):
    def limit() -> None:  # in the child: writes past `nbytes` fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_encode_on_a_full_disk_is_one_line_and_leaves_nothing(setup, tmp_path):
    # real failed writes inside HDF5 (a file-size limit, no root needed): this segfaulted (exit 139) after
    # thousands of h5py error lines and left its temp file
    out = tmp_path / "c.h5"
    argv = [sys.executable, "-m", "drivesim.cli.main", "encode", "--ae", str(setup / "ae"), "--data",
            str(setup / "data"), "--out", str(out), "--scale-factor", "keep", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=_file_size_limit(6000))
    assert run.returncode == 1, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {out}: write: File too large; nothing was written"], run.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
