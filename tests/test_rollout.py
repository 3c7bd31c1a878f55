"""Rollout mechanics: plan arithmetic, streamed decode == one-shot chunked decode, SIGKILL + --resume gives the
same latents and frames, clip-format output, sharding.

The models are RANDOMLY INITIALISED tiny-preset models (`drivesim.rollout.init_checkpoint_dir`, output convs
re-drawn so outputs depend on inputs): enough for the mechanics tested here, not for image quality.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from drivesim.datasets.clips import Box, read_annotation, read_manifest, read_video
from drivesim.datasets.scenario import Scenario, save_scenario

from drivesim.errors import ConfigError
from drivesim.rollout import RolloutConfig, load_models, make_plan, resolve_fps, shard, unit_generator

STEPS = "steps=2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, Path]:
    from drivesim.rollout import init_checkpoint_dir

    root = tmp_path_factory.mktemp("stack")
    init_checkpoint_dir(root / "ckpt", "tiny", seed=0)
    frames = [[Box("1", "car", 5 + k % 12, 10, 25 + k % 12, 26), Box("2", "pedestrian", 40, 8, 46, 24)]
              for k in range(15)]
    save_scenario(Scenario(fps=10.0, width=64, height=32, night=1, crowdedness=1, frames=frames), root / "s.json")
    return root / "ckpt", root / "s.json"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _cmd(ckpt: Path, scenario: Path, out: Path, frames: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "drivesim.cli.main", "rollout", "--scenario", str(scenario), "--ckpt-dir",
            str(ckpt), "--frames", str(frames), "--out", str(out), "--seed", "7", "--quiet", "--set", STEPS, *extra]


def _latents(out: Path) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted((out / "latents").glob("frames_*.npy"))])


# ---------------------------------------------------------------------------------------------------------------
# pure arithmetic
# ---------------------------------------------------------------------------------------------------------------


def _fake_models(pred_stride: int, interp_stride: int, interp_frames: int = 5, clip: int = 6):
    ae = SimpleNamespace(config=SimpleNamespace(decode_chunk_frames=8, decode_chunk_overlap=2))
    pred = SimpleNamespace(config=SimpleNamespace(frame_stride=pred_stride, num_frames=clip))
    interp = SimpleNamespace(config=SimpleNamespace(frame_stride=interp_stride, num_frames=interp_frames))
    return SimpleNamespace(autoencoder=ae, prediction=pred, interpolation=interp)


@pytest.mark.parametrize("pred_stride, interp_stride, stages", [(4, 1, (1,)), (16, 1, (0, 1)), (1, 1, ())])
def test_plan_stages_and_key_count(pred_stride, interp_stride, stages):
    for n in (1, 2, 17, 100, 601):
        plan = make_plan(_fake_models(pred_stride, interp_stride), RolloutConfig(), n, (128, 256))
        assert plan.stages == stages
        assert plan.key_spacing == pred_stride // interp_stride
        # enough key frames to cover every output frame, and not one interval more than needed
        assert (plan.num_keys - 1) * plan.key_spacing + 1 >= n
        assert n == 1 or (plan.num_keys - 2) * plan.key_spacing + 1 < n
        windows = plan.decode_windows
        assert windows[0][0] == 0 and windows[-1][1] == n
        # prediction units generate at least num_keys key frames
        made = 1 + sum(plan.clip_length - (1 if u == 1 else 2) for u in range(1, plan.num_units))
        assert made >= plan.num_keys


def test_plan_two_key_windows_rounds_key_count():
    plan = make_plan(_fake_models(4, 1, interp_frames=9), RolloutConfig(), 14, (32, 64))  # m = 2 intervals
    assert plan.window_keys == 3 and (plan.num_keys - 1) % 2 == 0


def test_plan_rejects_strides_that_are_not_x4_stages():
    from drivesim.errors import ConfigError

    with pytest.raises(ConfigError, match="frame_stride"):
        make_plan(_fake_models(8, 1), RolloutConfig(), 10, (32, 64))


def test_shard_assigns_each_item_exactly_once():
    items = list(range(11))
    for world in (1, 2, 3, 5):
        parts = [shard(items, r, world) for r in range(world)]
        assert sorted(sum(parts, [])) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(items, 2, 2)


def test_unit_generators_are_independent_of_order():
    a = torch.randn(4, generator=unit_generator(3, 5))
    torch.randn(100, generator=unit_generator(3, 4))
    assert torch.equal(a, torch.randn(4, generator=unit_generator(3, 5)))
    assert not torch.equal(a, torch.randn(4, generator=unit_generator(3, 6)))
    assert not torch.equal(a, torch.randn(4, generator=unit_generator(4, 5)))


# ---------------------------------------------------------------------------------------------------------------
# in-process: streamed decode equals the one-shot chunked decode; memory state stays bounded
# ---------------------------------------------------------------------------------------------------------------


def test_streamed_decode_equals_one_shot_decode(stack, tmp_path, request):
    from drivesim.pipeline.rollout import make_cond_fn, prepare_scenario
    from drivesim.rollout import Rollout, to_uint8

    ckpt, scen = stack
    torch.set_grad_enabled(False)
    request.addfinalizer(lambda: torch.set_grad_enabled(True))
    models = load_models(ckpt)
    cfg = resolve_fps(RolloutConfig(steps=1), models)
    n = 23
    plan = make_plan(models, cfg, n, (32, 64))
    cond_fn = make_cond_fn(prepare_scenario(scen, cfg.fps, plan.cond_frames), 8)
    written: list[np.ndarray] = []
    sizes = []

    def writer(path, frames, fps):
        written.append(frames)

    r = Rollout(models, cfg, cond_fn, n, tmp_path / "o", 0, writer, (32, 64),
                progress=lambda *a: sizes.append((r.keys.shape[0], r.latents.shape[0])))
    summary = r.run()
    assert summary["complete"] and summary["frames_written"] == n
    streamed = np.concatenate(written)
    lat = torch.from_numpy(_latents(tmp_path / "o"))
    assert lat.shape == (n, 4, 4, 8)
    keys = np.concatenate([np.load(f) for f in sorted((tmp_path / "o" / "latents").glob("keys_*.npy"))])
    assert np.array_equal(keys[:3], lat[::4][:3].numpy())  # key frames sit every key_spacing output frames
    ref = to_uint8(models.autoencoder.decode_scaled(lat[None])[0])
    assert streamed.shape == ref.shape
    assert np.abs(streamed.astype(int) - ref.astype(int)).max() <= 1  # float summation order only
    # working set: context window + current chunk, never the whole video
    assert max(k for k, _ in sizes) <= plan.clip_length + 2
    assert max(s for _, s in sizes) <= 8 + plan.key_spacing * 2


# ---------------------------------------------------------------------------------------------------------------
# real subprocesses: SIGKILL mid-run, --resume, identical output; clip-format output; sharding
# ---------------------------------------------------------------------------------------------------------------


def test_sigkill_then_resume_gives_identical_frames(stack, tmp_path):
    ckpt, scen = stack
    n = 30
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p_straight = subprocess.Popen(_cmd(ckpt, scen, straight, n), env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    p_killed = subprocess.Popen(_cmd(ckpt, scen, killed, n), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    state = killed / "state.json"
    deadline = time.time() + 300
    unit = 0
    while time.time() < deadline and p_killed.poll() is None:
        try:
            unit = json.loads(state.read_text())["unit"]
        except (OSError, ValueError, KeyError):
            unit = 0
        if unit >= 3:
            break
        time.sleep(0.05)
    os.kill(p_killed.pid, signal.SIGKILL)
    p_killed.wait()
    assert p_killed.returncode == -signal.SIGKILL, "the rollout finished before it could be killed"
    meta = json.loads(state.read_text())
    assert not meta["complete"] and 3 <= meta["unit"] < meta["num_units"]
    assert not (killed / "manifest.json").exists() and not (killed / "rollout.mp4").exists()

    again = subprocess.run(_cmd(ckpt, scen, killed, n), env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--resume" in again.stderr  # never silently restarts over a killed run
    resumed = subprocess.run(_cmd(ckpt, scen, killed, n, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at unit" in resumed.stdout
    out, _ = p_straight.communicate(timeout=300)
    assert p_straight.returncode == 0, out

    assert np.array_equal(_latents(straight), _latents(killed))
    a, b = read_video(straight / "rollout.mp4"), read_video(killed / "rollout.mp4")  # PyAV decode: playable
    assert a.shape == (n, 32, 64, 3) and np.array_equal(a, b)

    # clip format: manifest + annotation readable by the clip readers (export / eval use them)
    manifest = read_manifest(killed)
    assert [c.clip_id for c in manifest.clips] == ["rollout"]
    ann = read_annotation(killed / "rollout.json")
    assert ann.num_frames == n and (ann.width, ann.height, ann.night) == (64, 32, 1)
    assert [b.track_id for b in ann.frames[0]] == ["1", "2"]
    assert ann.frames[16][0].x1 == pytest.approx(5 + 1)  # scenario looped after 15 frames (ids offset per loop)
    record = json.loads((killed / "rollout_config.json").read_text())
    assert record["config"]["steps"] == 2 and record["plan"]["stages"] == [1]
    assert record["config"]["context_guidance"] == 1.1 and record["config"]["context_noise_level"] == 100
    assert not (killed / "segments").exists()


def test_rollout_fps_follows_the_stack_and_a_contradiction_is_refused(stack, tmp_path, capsys):
    # a 30 fps stack rolled out at the old default of 10 fps wrote video and boxes on a timeline 3x too slow, silently
    from drivesim.cli.main import main

    from drivesim.rollout import init_checkpoint_dir

    ckpt, scen = stack
    models = load_models(ckpt)  # tiny stack recorded as trained on 10 fps clips, interpolation frame_stride 1
    assert resolve_fps(RolloutConfig(), models).fps == 10.0
    assert resolve_fps(RolloutConfig(fps=10.0), models).fps == 10.0
    with pytest.raises(ConfigError, match="fps: 30 contradicts the stack, trained for 10 fps"):
        resolve_fps(RolloutConfig(fps=30.0), models)
    fast = init_checkpoint_dir(tmp_path / "fast", "tiny", seed=0, upsampler=False, data_fps=30.0)
    assert resolve_fps(RolloutConfig(), load_models(fast)).fps == 30.0
    old = init_checkpoint_dir(tmp_path / "old", "tiny", seed=0, upsampler=False, data_fps=None)
    with pytest.raises(ConfigError, match="do not record the frame rate"):
        resolve_fps(RolloutConfig(), load_models(old))
    assert resolve_fps(RolloutConfig(fps=12.5), load_models(old)).fps == 12.5  # an older stack: the user says
    capsys.readouterr()
    rc = main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "9", "--out",
               str(tmp_path / "o"), "--quiet", "--set", "steps=1", "--set", "fps=30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "fps: 30 contradicts the stack" in err[0]
    assert not (tmp_path / "o").exists()


def test_resume_with_another_config_is_refused(stack, tmp_path):
    ckpt, scen = stack
    out = tmp_path / "o"
    from drivesim.cli.main import main

    assert main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "9", "--out", str(out),
                 "--quiet", "--set", "steps=1"]) == 0
    (out / "manifest.json").unlink()
    rc = main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "9", "--out", str(out),
               "--quiet", "--set", "steps=1", "--seed", "1", "--resume"])
    assert rc == 1


def test_scenarios_are_sharded_over_ranks(stack, tmp_path):
    ckpt, scen = stack
    folder = tmp_path / "scen"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.json").write_text(scen.read_text())
    base = [sys.executable, "-m", "drivesim.cli.main", "rollout", "--scenarios", str(folder), "--ckpt-dir",
            str(ckpt), "--frames", "1", "--out", str(tmp_path / "out"), "--quiet", "--json", "--set", "steps=1"]
    done = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE="2")
        r = subprocess.run(base, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        done.append({Path(x["scenario"]).stem: x["seed"] for x in json.loads(r.stdout)})
    assert done == [{"a": 0, "c": 2}, {"b": 1}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c"]
    assert all(read_video(tmp_path / "out" / s / "rollout.mp4").shape[0] == 1 for s in "abc")
    # the sharded outputs equal one process rolling out every scenario (same seeds, same frames)
    single = [a if a != str(tmp_path / "out") else str(tmp_path / "single") for a in base]
    r = subprocess.run(single, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for s in "abc":
        np.testing.assert_array_equal(read_video(tmp_path / "single" / s / "rollout.mp4"),
                                      read_video(tmp_path / "out" / s / "rollout.mp4"))


def test_each_process_takes_its_own_device():
    from drivesim.rollout import process_device

    assert process_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert process_device("cuda:1", {"LOCAL_RANK": "3"}) == "cuda:1"  # an explicit index is kept
    assert process_device("cpu", {"LOCAL_RANK": "3"}) == "cpu"
    assert process_device("cuda", {}) == "cuda"


def test_labels_follow_the_rollout_resolution(stack, tmp_path):
    """A rollout at twice the scenario's pixel size writes the scenario's boxes scaled into its own frame."""
    ckpt, scen = stack
    out = tmp_path / "big"
    from drivesim.cli.main import main

    assert main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "5", "--out", str(out),
                 "--quiet", "--set", "steps=1", "--set", "resolution=[64, 128]"]) == 0
    ann = read_annotation(out / "rollout.json")
    assert (ann.width, ann.height) == (128, 64)
    assert read_video(out / "rollout.mp4").shape[1:3] == (64, 128)
    first = {b.track_id: b for b in ann.frames[0]}
    assert (first["1"].x1, first["1"].y1, first["1"].x2, first["1"].y2) == (10.0, 20.0, 50.0, 52.0)
    assert (first["2"].x1, first["2"].x2) == (80.0, 92.0)


def test_kill_between_the_two_state_writes_still_resumes(stack, tmp_path, monkeypatch, request):
    # the state is a tensors file and state.json; a kill after the first write and before the second left a pair
    # no resume could read ("tensors_sha256: does not match state.json"). Simulate that kill, resume, compare.
    import drivesim.rollout.runner as rollout_module
    from drivesim.pipeline.rollout import make_cond_fn, prepare_scenario
    from drivesim.rollout import Rollout

    ckpt, scen = stack
    torch.set_grad_enabled(False)
    request.addfinalizer(lambda: torch.set_grad_enabled(True))
    models = load_models(ckpt)
    cfg = resolve_fps(RolloutConfig(steps=1), models)
    n = 30
    plan = make_plan(models, cfg, n, (32, 64))

    def rollout(out):
        cond_fn = make_cond_fn(prepare_scenario(scen, cfg.fps, plan.cond_frames), 8)
        return Rollout(models, cfg, cond_fn, n, out, 0, lambda path, frames, fps: None, (32, 64))

    assert rollout(tmp_path / "straight").run()["complete"]
    out = tmp_path / "killed"
    rollout(out).run(max_units=1)
    real_json = rollout_module._atomic_json

    def killed(path, data):
        raise KeyboardInterrupt("killed between the tensors and state.json")

    monkeypatch.setattr(rollout_module, "_atomic_json", killed)
    with pytest.raises(KeyboardInterrupt):
        rollout(out).run(resume=True, max_units=1)
    monkeypatch.setattr(rollout_module, "_atomic_json", real_json)
    summary = rollout(out).run(resume=True)
    assert summary["complete"] and summary["resumed_from"] == 1
    np.testing.assert_array_equal(_latents(out), _latents(tmp_path / "straight"))
    assert len(list(out.glob("state*.safetensors"))) == 1  # the orphan of the killed write is gone


def test_a_stack_mixing_autoencoders_is_refused(tmp_path):
    # latent models record the encoder identity of the cache they were trained on; a stack whose autoencoder
    # produces other latents was rolled out silently
    from drivesim.datasets.latent_cache import encoder_id

    from drivesim.errors import CheckpointError
    from drivesim.rollout import init_checkpoint_dir

    ckpt = init_checkpoint_dir(tmp_path / "ckpt", "tiny", seed=0, upsampler=False)
    ae_id = encoder_id(*load_models(ckpt).autoencoder.encoder_fingerprint())
    for name in ("image_ldm", "prediction", "interpolation"):
        cfg_path = ckpt / name / "config.json"
        data = json.loads(cfg_path.read_text())
        data["config"]["encoder_id"] = ae_id
        cfg_path.write_text(json.dumps(data))
    load_models(ckpt)  # the stack's own autoencoder: accepted
    data = json.loads((ckpt / "prediction" / "config.json").read_text())
    data["config"]["encoder_id"] = "0" * 64
    (ckpt / "prediction" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="prediction: encoder_id: prediction was trained on latents of another"):
        load_models(ckpt)


def test_labels_mark_the_boxes_that_did_not_condition_the_frame(stack, tmp_path, capsys):
    # the tiny U-Net has 8 box slots: a frame with 12 boxes is conditioned on its 8 largest, but rollout.json listed
    # all 12 and the export made object labels of the 4 the model was never asked for
    from drivesim.cli.main import main
    from drivesim.datasets.scenario import load_scenario

    from drivesim.pipeline.rollout import make_cond_fn

    ckpt, _ = stack
    order = [3, 10, 0, 7, 11, 5, 1, 8, 2, 9, 6, 4]  # not sorted by area: the area decides, not the file order
    crowded = [Box(str(j), "car", 5 * j, 0, 5 * j + 4, 2 + 2 * j) for j in order]  # area 8 + 8j: distinct
    frames = [crowded] * 3 + [crowded[:2]] * 2
    scen = tmp_path / "crowded.json"
    save_scenario(Scenario(fps=10.0, width=64, height=32, night=0, crowdedness=12, frames=frames), scen)
    out = tmp_path / "o"
    capsys.readouterr()
    assert main(["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "5", "--out", str(out),
                 "--quiet", "--set", "steps=1"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(r"12 labelled box\(es\) in 3 frame\(s\) did not condition .*max_boxes=8",
                                       err[0]), err

    ann = read_annotation(out / "rollout.json")
    # independent of the packer: the 8 largest by a sort in the test
    for k, boxes in enumerate(ann.frames):
        largest = {b.track_id for b in sorted(frames[k], key=lambda b: -(b.x2 - b.x1) * (b.y2 - b.y1))[:8]}
        assert {b.track_id for b in boxes} == {b.track_id for b in frames[k]}  # nothing dropped silently
        assert {b.track_id for b in boxes if b.conditioned} == largest
    assert {b.track_id for b in ann.frames[0] if not b.conditioned} == {"0", "1", "2", "3"}
    raw = json.loads((out / "rollout.json").read_text())["frames"][0]["boxes"]
    assert sorted(b["track_id"] for b in raw if b.get("conditioned") is False) == ["0", "1", "2", "3"]
    # the labels marked conditioned are exactly the boxes in the conditioning tensors of the frame
    cond = make_cond_fn(load_scenario(scen), 8)(list(range(5)))
    for k, boxes in enumerate(ann.frames):
        given = {tuple(np.round(v, 4)) for v in cond.boxes[0, k][cond.box_mask[0, k]].tolist()}
        labelled = {tuple(np.round([b.x1 / 64, b.y1 / 32, b.x2 / 64, b.y2 / 32], 4)) for b in boxes if b.conditioned}
        assert given == labelled
    record = json.loads((out / "rollout_config.json").read_text())["unconditioned_boxes"]
    assert (record["boxes"], record["frames"], record["max_boxes"]) == (12, 3, 8)

    # export: COCO makes them ignore regions (iscrowd 1), YOLO (no ignore regions) leaves them out; both count them
    assert main(["export", str(out), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(note) == 1 and "12 box(es) in 3 frame(s) did not condition" in note[0] and "iscrowd 1" in note[0]
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert sorted(a["track_id"] for a in first if a["iscrowd"] == 1) == ["0", "1", "2", "3"]
    assert all(a["attributes"]["conditioned"] is (a["iscrowd"] == 0) for a in coco["annotations"])
    summary = json.loads((tmp_path / "coco" / "export.json").read_text())
    assert summary["boxes"] == 3 * 8 + 2 * 2 and summary["unconditioned_boxes"]["boxes"] == 12
    assert main(["export", str(out), "--format", "yolo", "--out", str(tmp_path / "yolo")]) == 0
    assert "left out of the YOLO labels" in capsys.readouterr().err
    lines = (tmp_path / "yolo" / "labels" / "val" / "rollout_000000.txt").read_text().splitlines()
    assert len(lines) == 8
    # a scenario taken from the rollout asks for every box again
    assert all(b.conditioned for f in Scenario.from_clip(ann).frames for b in f)
    # box fidelity (eval boxes, the demo) makes them ignore regions, not boxes the video failed to draw
    from drivesim.eval.box_fidelity import load_clip_frames

    gt = load_clip_frames(out, None, (32, 64)).boxes
    assert [int(f.ignore.sum()) for f in gt] == [4, 4, 4, 0, 0] and len(gt[0].boxes) == 12


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def test_sigterm_is_handled_like_ctrl_c(stack, tmp_path):
    # SIGTERM killed the process where it stood: temp files (.rollout.mp4.tmpPID.mp4, .state-N.safetensors.tmp,
    # .seg_*.tmpPID.mp4) stayed; now it unwinds like Ctrl-C, exit 143, and the committed state stays resumable
    ckpt, scen = stack
    out = tmp_path / "o"
    proc = subprocess.Popen(_cmd(ckpt, scen, out, 30), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "state.json").read_text())["unit"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the rollout finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err, err
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], sorted(out.rglob("*"))
    meta = json.loads((out / "state.json").read_text())
    assert 1 <= meta["unit"] < meta["num_units"] and (out / meta["tensors_file"]).is_file()


def test_a_rollout_that_fails_before_its_first_unit_leaves_nothing(stack, tmp_path, monkeypatch):
    from drivesim.cli.main import main

    from drivesim.rollout import Rollout

    def stopped(self):
        raise KeyboardInterrupt

    ckpt, scen = stack
    monkeypatch.setattr(Rollout, "_run_unit", stopped)
    argv = ["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "5", "--quiet", "--set",
            "steps=1", "--out"]
    assert main([*argv, str(tmp_path / "new")]) == 130
    assert not (tmp_path / "new").exists()  # was: scenario.json, rollout_config.json, latents/, segments/
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert main([*argv, str(tmp_path / "mine")]) == 130
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_refused_resume_leaves_the_folder_as_it_was(stack, tmp_path):
    from drivesim.cli.main import main

    ckpt, scen = stack
    out = tmp_path / "o"
    argv = ["rollout", "--scenario", str(scen), "--ckpt-dir", str(ckpt), "--frames", "5", "--out", str(out),
            "--quiet", "--set", "steps=1"]
    assert main(argv) == 0
    before = _tree(out)
    assert "segments" not in before
    assert main([*argv, "--seed", "1", "--resume"]) == 1  # another seed: refused
    assert _tree(out) == before  # segments/ was made again before the state was read


def test_resume_sweeps_the_temp_files_of_a_killed_run(stack, tmp_path, request):
    # SIGKILL runs no cleanup: the temp files of the writes it interrupted stay; the next resume removes them and
    # nothing else
    from drivesim.pipeline.rollout import make_cond_fn, prepare_scenario
    from drivesim.rollout import Rollout

    ckpt, scen = stack
    torch.set_grad_enabled(False)
    request.addfinalizer(lambda: torch.set_grad_enabled(True))
    models = load_models(ckpt)
    cfg = resolve_fps(RolloutConfig(steps=1), models)
    plan = make_plan(models, cfg, 30, (32, 64))

    def rollout(out):
        cond_fn = make_cond_fn(prepare_scenario(scen, cfg.fps, plan.cond_frames), 8)
        return Rollout(models, cfg, cond_fn, 30, out, 0, lambda path, frames, fps: None, (32, 64))

    out = tmp_path / "r"
    rollout(out).run(max_units=1)
    leftovers = [".rollout.mp4.tmp4242.mp4", ".state-000002.safetensors.tmp", ".state.json.tmp",
                 ".rollout.json.k3j2h1", ".rollout_config.json.x9y8z7"]
    kept = ["notes.txt", ".my_own_file"]
    for name in leftovers + kept:
        (out / name).write_text("x")
    assert rollout(out).run(resume=True)["complete"]
    assert not [n for n in leftovers if (out / n).exists()]
    assert all((out / n).exists() for n in kept)
