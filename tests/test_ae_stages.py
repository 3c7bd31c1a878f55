"""Smoke run through the CLI: `drivesim train autoencoder` then `drivesim train video_decoder` on tiny data."""

from __future__ import annotations

import pytest
import torch
from drivesim.cli.main import main
from drivesim.datasets.clips import write_synthetic_dataset

import drivesim
from drivesim.autoencoder import AutoencoderKL, VideoAutoencoder
from drivesim.nn.temporal import force_alpha_one


def test_train_autoencoder_then_video_decoder(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "data", clips=2, frames=6, size=(32, 64), splits=("train", "val"))
    data, runs = str(tmp_path / "data"), tmp_path / "runs"
    assert main(["train", "autoencoder", "--preset", "tiny", "--data", data, "--out", str(runs / "ae"),
                 "--no-progress"]) == 0
    ae = drivesim.load(runs / "ae" / "model")
    assert isinstance(ae, AutoencoderKL) and int(ae.global_step) == 4  # tiny: 4 steps, disc on from step 2
    assert main(["train", "video_decoder", "--preset", "tiny", "--data", data, "--out", str(runs / "vd"),
                 "--no-progress"]) == 1
    assert "autoencoder" in capsys.readouterr().err  # the required --opt is named
    assert main(["train", "video_decoder", "--preset", "tiny", "--data", data, "--out", str(runs / "vd"),
                 "--opt", f"autoencoder={runs / 'ae' / 'model'}", "--opt", "frames=4", "--no-progress",
                 "--set", "train.lr=1e-2"]) == 0
    video = drivesim.load(runs / "vd" / "model")
    assert isinstance(video, VideoAutoencoder) and video.attach_to(ae) is video
    # the encoder and the spatial decoder did not move; the temporal layers did
    for k, v in ae.state_dict().items():
        if k.startswith(("encoder.", "decoder.")):
            assert torch.equal(video.state_dict()[k], v), k
    assert any(p.abs().sum() > 0 for n, p in video.named_parameters() if "temporal" in n and "conv2" in n)
    z = torch.randn(1, 5, 4, 4, 8)
    with torch.no_grad(), force_alpha_one(video):
        assert torch.equal(video.decode(z), ae.decode(z))


@pytest.mark.parametrize("opt", ["hflip=2", "nope=1"])
def test_autoencoder_stage_bad_options(tmp_path, opt, capsys):
    write_synthetic_dataset(tmp_path / "data", clips=1, frames=2, size=(32, 64), splits=("train",))
    assert main(["train", "autoencoder", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "r"), "--opt", opt, "--no-progress"]) == 1
    assert opt.split("=")[0] in capsys.readouterr().err
