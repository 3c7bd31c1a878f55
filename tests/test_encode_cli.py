"""`drivesim encode`: a tiny autoencoder fills the latent cache; scale factor computed and stored; bad flags."""

from __future__ import annotations

import dataclasses
import json

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
