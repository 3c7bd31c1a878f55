"""Absurd lengths are refused up front with the limit named (they ran out of memory after minutes of work)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from drivesim.datasets.scenario import MAX_FRAMES as MAX_SCENARIO_FRAMES
from drivesim.datasets.scenario import Scenario, extend

from drivesim.errors import ConfigError
from drivesim.rollout import MAX_FRAMES, MAX_MINUTES, RolloutConfig, check_rollout_length, make_plan


@pytest.mark.parametrize("minutes, shown", [(1e9, "1e9"), (float("inf"), "inf"), (60.5, "60.5"), (61.0, "61")])
def test_rollout_minutes_beyond_the_limit(minutes, shown):
    with pytest.raises(ConfigError, match=rf"^--minutes: {shown} exceeds the limit of 60 \(minutes of video per "
                                          r"rollout\)$"):
        check_rollout_length(minutes=minutes)


def test_rollout_lengths_within_the_limits_pass():
    check_rollout_length(minutes=MAX_MINUTES)
    check_rollout_length(frames=MAX_FRAMES)
    with pytest.raises(ConfigError, match=rf"^--frames: {MAX_FRAMES + 1} exceeds the limit of {MAX_FRAMES} "):
        check_rollout_length(frames=MAX_FRAMES + 1)
    with pytest.raises(ConfigError, match="--minutes: must be a number"):
        check_rollout_length(minutes=float("nan"))


def test_plan_refuses_more_frames_than_the_limit():
    # minutes within the limit at a high fps still give too many frames: the plan (decode windows) is the guard
    def config(**kw):
        return SimpleNamespace(config=SimpleNamespace(**kw))

    models = SimpleNamespace(autoencoder=config(decode_chunk_frames=8, decode_chunk_overlap=2),
                             prediction=config(frame_stride=4, num_frames=6),
                             interpolation=config(frame_stride=1, num_frames=5))
    assert make_plan(models, RolloutConfig(), MAX_FRAMES, (32, 64)).num_frames == MAX_FRAMES
    with pytest.raises(ConfigError, match=rf"num_frames: {60 * 60 * 120} exceeds the limit of {MAX_FRAMES}"):
        make_plan(models, RolloutConfig(), 60 * 60 * 120, (32, 64))  # an hour at 120 fps


def test_scenario_extension_is_refused_before_building_the_frames():
    s = Scenario(fps=10.0, width=64, height=32, night=0, crowdedness=0, frames=[[], []])
    assert extend(s, 100, "loop").num_frames == 100
    with pytest.raises(ConfigError, match=rf"^scenario: 600000000000 frames \(1e9 minutes at 10 fps\) exceeds the "
                                          rf"limit of {MAX_SCENARIO_FRAMES} frames"):
        extend(s, 600_000_000_000, "loop")


def test_a_failed_torch_allocation_is_one_line(tmp_path, capsys):
    # `sample-image -n 1e15` drew every sample at once (beyond any address space, even with overcommit); torch
    # reports a failed allocation as a RuntimeError, which leaked as a traceback. -n now has a limit of its own (a
    # catalogue row); an image of 8e7 x 8e7 pixels reaches the same backstop: its noise tensor alone is 1.6e15 bytes
    import json

    from drivesim.cli.main import main

    from drivesim.configs import get_preset
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.training.checkpoint import save_model

    save_model(ImageLDM(get_preset("tiny").image_ldm), tmp_path / "ckpt")
    side = 8 * 10**7
    (tmp_path / "boxes.json").write_text(json.dumps({"width": side, "height": side, "boxes": [
        {"class": "car", "x1": 1, "y1": 2, "x2": 30, "y2": 20}]}))
    capsys.readouterr()
    assert main(["sample-image", "--ckpt", str(tmp_path / "ckpt"), "--boxes", str(tmp_path / "boxes.json"), "--out",
                 str(tmp_path / "out"), "-n", "1", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: out of memory: .*; it tried to allocate [\d.]+ GiB", err), err
    assert not (tmp_path / "out").exists()
