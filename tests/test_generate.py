"""`drivesim generate`: augmentations of source tracks (geometry checked without models), generate -> validate ->
export end to end, every augmentation in the labels, resume equality, two-process sharding, bad input.

The stack is RANDOMLY INITIALISED tiny-preset models (`drivesim.rollout.init_checkpoint_dir`): enough for the
mechanics tested here, not for image quality. The source is `write_synthetic_dataset` (64x32, 10 fps).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.augment import Augmentations, augment, hflip
from drivesim.datasets.clips import Box, read_annotation, read_manifest, read_video, write_synthetic_dataset
from drivesim.datasets.scenario import Scenario, save_scenario

from drivesim.errors import ConfigError
from drivesim.pipeline.generate import clip_seed, generate_dataset

W, H = 64, 32


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    from drivesim.rollout import init_checkpoint_dir

    root = tmp_path_factory.mktemp("gen")
    init_checkpoint_dir(root / "stack", "tiny", seed=0, upsampler=False)
    write_synthetic_dataset(root / "data", clips=3, frames=6, size=(H, W))  # splits train, val, train
    return {"stack": root / "stack", "data": root / "data", "root": root}


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if k not in extra:
            env.pop(k, None)
    return env


def _args(base: dict, out: Path, *extra: str) -> list[str]:
    return ["generate", str(base["data"]), "--stack", str(base["stack"]), "--out", str(out), "--steps", "1",
            "--quiet", *extra]


def _same_dataset(a: Path, b: Path, *, command: bool = True) -> None:
    """Same clips: manifest (but its command line, when `command` is False), annotation bytes, decoded frames."""
    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    if not command:
        ma.pop("command"), mb.pop("command")
    assert ma == mb
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for row in ma["clips"]:
        assert (a / row["annotation"]).read_bytes() == (b / row["annotation"]).read_bytes()
        np.testing.assert_array_equal(read_video(a / row["video"]), read_video(b / row["video"]))


# ---------------------------------------------------------------------------------------------------------------
# augmentations: geometry without models
# ---------------------------------------------------------------------------------------------------------------


def _scenario() -> Scenario:
    frames = [[Box("a", "car", 2 + k, 4, 20 + k, 16), Box("b", "pedestrian", 40, 1, 50, 30),
               *([Box("c", "truck", 0, 20, 8, 32)] if k < 3 else [])] for k in range(6)]
    return Scenario(fps=10.0, width=W, height=H, night=0, crowdedness=2, frames=frames, source="t")


def test_hflip_maps_x_to_width_minus_x():
    s = hflip(_scenario())
    b = s.frames[2][0]
    assert (b.x1, b.y1, b.x2, b.y2) == (W - 22, 4, W - 4, 16)  # [x0, y0, x1, y1] -> [W - x1, y0, W - x0, y1]
    assert hflip(s).frames == _scenario().frames  # an involution


def test_each_augmentation_changes_the_scenario_as_documented():
    src = _scenario()
    s, rec = augment(src, Augmentations(time_shift=2, flip_daynight=True), seed=5)
    assert s.frames == src.frames[2:] and s.night == 1 and rec == {"time_shift": {"frames": 2},
                                                                   "flip_daynight": {"night": [0, 1]}}
    # drop: whole tracks go, crowdedness loses the dropped vehicles; find seeds that drop something and not all
    outcomes = {}
    for seed in range(40):
        s, rec = augment(src, Augmentations(drop_boxes=0.5), seed)
        dropped = set(rec["drop_boxes"]["dropped_tracks"])
        assert all(b.track_id not in dropped for boxes in s.frames for b in boxes)
        assert all(any(b.track_id == t for b in boxes) for boxes in s.frames[:3] for t in {"a", "b", "c"} - dropped)
        assert s.crowdedness == 2 - len(dropped & {"a", "c"})  # a and c are vehicles, b a pedestrian
        outcomes[frozenset(dropped)] = seed
    assert len(outcomes) >= 4  # the draws differ by seed
    # jitter: one integer offset per track, within [-PX, PX], boxes clipped to the image (c sits in a corner)
    s, rec = augment(src, Augmentations(jitter_boxes=3), seed=1)
    offsets = rec["jitter_boxes"]["offsets"]
    assert set(offsets) == {"a", "b", "c"} and all(abs(v) <= 3 for d in offsets.values() for v in d)
    assert any(v != 0 for d in offsets.values() for v in d)
    for before, after in zip(src.frames, s.frames, strict=True):
        for b0, b1 in zip(before, after, strict=True):
            dx, dy = offsets[b0.track_id]
            assert (b1.x1, b1.y1, b1.x2, b1.y2) == (max(b0.x1 + dx, 0), max(b0.y1 + dy, 0), min(b0.x2 + dx, W),
                                                    min(b0.y2 + dy, H))


def test_augmentations_are_reproducible_and_independent_of_each_other():
    src = _scenario()
    a, ra = augment(src, Augmentations(drop_boxes=0.4, jitter_boxes=4, hflip=True), seed=11)
    b, rb = augment(src, Augmentations(drop_boxes=0.4, jitter_boxes=4, hflip=True), seed=11)
    assert a == b and ra == rb
    _, only_drop = augment(src, Augmentations(drop_boxes=0.4), seed=11)
    assert only_drop["drop_boxes"] == ra["drop_boxes"]  # switching jitter on does not change which tracks go
    with pytest.raises(ConfigError, match="--drop-boxes"):
        Augmentations(drop_boxes=1.5).check()
    with pytest.raises(ConfigError, match="--time-shift: 6 frames leaves nothing"):
        augment(src, Augmentations(time_shift=6), seed=0)


# ---------------------------------------------------------------------------------------------------------------
# end to end through the CLI
# ---------------------------------------------------------------------------------------------------------------


def test_generate_validate_export_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(_args(base, out, "--clips", "4", "--seed", "3")) == 0
    src = read_manifest(base["data"])
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["clips"]
    # one clip per sample, cycling over the source clips, each keeping its source's split
    assert [r["id"] for r in rows] == [f"gen_{k:06d}" for k in range(4)]
    assert [r["source_clip"] for r in rows] == ["clip_0000", "clip_0001", "clip_0002", "clip_0000"]
    assert [r["split"] for r in rows] == ["train", "val", "train", "train"]
    assert [r["seed"] for r in rows] == [clip_seed(3, k) for k in range(4)] and len({r["seed"] for r in rows}) == 4
    assert all(r["augmentations"] == {} for r in rows)
    gen = manifest["generate"]
    for name in ("autoencoder", "image_ldm", "prediction", "interpolation"):
        weights = base["stack"] / name / "model.safetensors"
        assert gen["checkpoints"][name] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "upsampler" not in gen["checkpoints"]
    assert manifest["seed"] == 3 and gen["rollout_config"]["steps"] == 1
    assert manifest["command"].startswith("drivesim generate ") and "--clips 4" in manifest["command"]
    assert not (out / ".generate").exists()
    # the labels are the conditioning boxes: without augmentations, the source clip's boxes
    for row in rows:
        ann = read_annotation(out / row["annotation"])
        real = read_annotation(src.root / f"{row['source_clip']}.json")
        assert ann.clip_id == row["id"] and (ann.night, ann.crowdedness, ann.fps) == (real.night, real.crowdedness,
                                                                                      real.fps)
        assert ann.frames == real.frames
        assert read_video(out / row["video"]).shape == (6, H, W, 3)
    # two samples of one source clip: same labels, other noise
    assert not np.array_equal(read_video(out / "gen_000000.mp4"), read_video(out / "gen_000003.mp4"))

    assert main(["data", "validate", str(out)]) == 0
    for fmt in ("coco", "yolo"):
        assert main(["export", str(out), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    boxes = sum(len(f) for r in rows for f in read_annotation(out / r["annotation"]).frames)
    assert len(coco["images"]) == 4 * 6 and len(coco["annotations"]) == boxes
    assert len(list((tmp_path / "yolo" / "labels" / "val").glob("*.txt"))) == 6  # the one val clip's frames
    capsys.readouterr()
    # the same command again: nothing to do; other options on the finished dataset: refused, naming the setting
    assert main(_args(base, out, "--clips", "4", "--seed", "3")) == 0
    assert "0 made now" in capsys.readouterr().out
    assert main(_args(base, out, "--clips", "4", "--seed", "4")) == 1
    assert "another seed" in capsys.readouterr().err


def test_every_augmentation_is_written_into_the_labels(base, tmp_path):
    out = tmp_path / "gen"
    k_shift, px = 1, 2
    assert main(_args(base, out, "--clips", "3", "--seed", "2", "--hflip", "--flip-daynight", "--time-shift",
                      str(k_shift), "--jitter-boxes", str(px), "--drop-boxes", "0.4")) == 0
    rows = json.loads((out / "manifest.json").read_text())["clips"]
    dropped_any = kept_any = False
    for row in rows:
        aug = row["augmentations"]
        assert set(aug) == {"time_shift", "hflip", "drop_boxes", "jitter_boxes", "flip_daynight"}
        real = read_annotation(base["data"] / f"{row['source_clip']}.json")
        ann = read_annotation(out / row["annotation"])
        dropped = set(aug["drop_boxes"]["dropped_tracks"])
        offsets = aug["jitter_boxes"]["offsets"]
        assert all(abs(v) <= px for d in offsets.values() for v in d)
        dropped_any |= bool(dropped)
        # the labels computed here from the source and the recorded draws, independently of the augment code
        assert ann.num_frames == real.num_frames - k_shift and row["num_frames"] == ann.num_frames
        for k, boxes in enumerate(ann.frames):
            want = []
            for b in real.frames[k + k_shift]:
                if b.track_id in dropped:
                    continue
                dx, dy = offsets[b.track_id]
                x1, y1, x2, y2 = W - b.x2 + dx, b.y1 + dy, W - b.x1 + dx, b.y2 + dy
                x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)  # clipped to the image
                if x2 > x1 and y2 > y1:
                    want.append((b.track_id, b.cls, x1, y1, x2, y2))
            assert [(b.track_id, b.cls, b.x1, b.y1, b.x2, b.y2) for b in boxes] == want
            kept_any |= bool(want)
        assert ann.night == 1 - real.night and aug["flip_daynight"]["night"] == [real.night, 1 - real.night]
        vehicles = {b.track_id for f in real.frames for b in f if b.cls in ("car", "truck")}
        assert ann.crowdedness == real.crowdedness - len(dropped & vehicles)
        # the record is what the seeded augmentation draws for this clip seed (reproducible)
        from drivesim.datasets.scenario import Scenario as S

        _, rec = augment(S.from_clip(real), Augmentations(k_shift, True, 0.4, px, True), row["seed"])
        assert rec == aug
    assert dropped_any and kept_any  # the seed exercises both outcomes: the test can fail
    assert main(["data", "validate", str(out)]) == 0


def test_scenario_files_as_source(base, tmp_path, capsys):
    folder = tmp_path / "scen"
    frames = [[Box("7", "car", 8 + k, 8, 30 + k, 24)] for k in range(5)]
    save_scenario(Scenario(10.0, W, H, 1, 1, frames), folder / "b.json")
    save_scenario(Scenario(10.0, W, H, 0, 1, frames[:4]), folder / "a.json")
    out = tmp_path / "gen"
    assert main(["generate", str(folder), "--stack", str(base["stack"]), "--out", str(out), "--steps", "1",
                 "--clips", "3", "--frames", "4", "--quiet"]) == 0
    rows = read_manifest(out).clips
    meta = json.loads((out / "manifest.json").read_text())["clips"]
    assert [m["source_clip"] for m in meta] == ["a.json", "b.json", "a.json"]
    assert {r.split for r in rows} == {"train"}
    assert [read_annotation(r.annotation).night for r in rows] == [0, 1, 0]
    assert all(read_annotation(r.annotation).num_frames == 4 for r in rows)
    capsys.readouterr()
    assert main(["generate", str(folder), "--stack", str(base["stack"]), "--out", str(tmp_path / "g2"), "--split",
                 "val", "--quiet"]) == 1
    assert "--split" in capsys.readouterr().err and not (tmp_path / "g2").exists()


# ---------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------


def test_a_stopped_run_resumes_to_the_uninterrupted_dataset(base, tmp_path):
    opts = dict(clips=3, seed=9, steps=1, augmentations=Augmentations(hflip=True, jitter_boxes=2), progress=False,
                command="drivesim generate (test)")
    straight = tmp_path / "straight"
    generate_dataset([base["data"]], base["stack"], straight, **opts)
    out = tmp_path / "stopped"
    first = generate_dataset([base["data"]], base["stack"], out, max_clips=1, **opts)
    assert first["made"] == 1 and not first["complete"]
    assert not (out / "manifest.json").exists() and (out / "gen_000000.mp4").is_file()
    assert not (out / "gen_000001.mp4").exists()
    # a crash while clip 1 was being put in place: a half-written mp4 without a done record is made again
    (out / "gen_000001.mp4").write_bytes(b"\x00" * 100)
    # another seed on the unfinished run is refused, naming the setting, and changes nothing
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ConfigError, match="another seed"):
        generate_dataset([base["data"]], base["stack"], out, **(opts | {"seed": 10}))
    assert sorted(p.name for p in out.rglob("*")) == before
    rest = generate_dataset([base["data"]], base["stack"], out, **opts)
    assert (rest["made"], rest["kept"], rest["complete"]) == (2, 1, True)
    _same_dataset(straight, out)


@pytest.mark.slow
def test_sigkill_in_the_middle_then_rerun_gives_the_uninterrupted_dataset(base, tmp_path):
    """A real kill (SIGKILL, no cleanup) after the first clip, possibly inside the second clip's rollout."""
    args = ["--clips", "3", "--seed", "5", "--frames", "12", "--drop-boxes", "0.3", "--json"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_args(base, straight, *args)) == 0
    cmd = [sys.executable, "-m", "drivesim.cli.main", *_args(base, killed, *args)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = killed / ".generate" / "done"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(done.glob("*.json")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "manifest.json").exists()
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["kept"] >= 1 and summary["made"] == 3 - summary["kept"] and summary["complete"]
    _same_dataset(straight, killed, command=False)


# ---------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------


def test_two_processes_make_the_same_clips_as_one(base, tmp_path):
    args = ["--clips", "5", "--seed", "1", "--flip-daynight", "--drop-boxes", "0.3"]
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "drivesim.cli.main", *_args(base, two, *args), "--json"]
    # both at once, as `accelerate launch --num_processes 2` starts them; the main process waits for the other
    procs = [subprocess.Popen(cmd, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
    assert [(r["rank"], r["made"], r["complete"]) for r in results] == [(0, 3, True), (1, 2, False)]
    assert main(_args(base, one, *args)) == 0
    _same_dataset(one, two, command=False)
    assert not (two / ".generate").exists()


def test_the_main_process_reports_a_failed_process_and_a_rerun_completes(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    state = out / ".generate"
    state.mkdir(parents=True)
    # process 1 of 2 failed (its record is dated after the main process started)
    (state / "failed-1.json").write_text(json.dumps({"rank": 1, "time": time.time() + 3600, "error": "boom"}))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_args(base, out, "--clips", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "process 1 of 2 failed (boom)" in err[0] and "1 clip(s) missing" in err[0]
    assert (out / "gen_000000.mp4").is_file() and not (out / "manifest.json").exists()
    # the main process alone (one process now) finishes the dataset: its clip is kept, the other one made
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(_args(base, out, "--clips", "2", "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["made"], summary["kept"], summary["complete"]) == (1, 1, True)
    assert main(["data", "validate", str(out)]) == 0


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line naming the thing, exit 1, nothing written
# ---------------------------------------------------------------------------------------------------------------


def _bad_cases(base: dict, tmp: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    train_only = tmp / "train_only"
    write_synthetic_dataset(train_only, clips=1, frames=2, size=(H, W))
    odd = tmp / "odd.json"
    save_scenario(Scenario(10.0, 60, 30, 0, 0, [[]]), odd)
    data, stack = str(base["data"]), str(base["stack"])
    return [
        (["generate", data, "--stack", str(tmp / "nostack")], "--stack: folder not found"),
        (["generate", data, "--stack", str(base["data"])], "checkpoint folder not found"),
        (["generate", str(empty), "--stack", stack], "no manifest.json and no *.json scenario files"),
        (["generate", str(train_only), "--stack", stack, "--split", "val"], "the dataset has no val clips"),
        (["generate", str(tmp / "missing"), "--stack", stack], "SOURCE: not found"),
        (["generate", data, "--stack", stack, "--clips", "0"], "--clips: must be >= 1"),
        (["generate", data, "--stack", stack, "--frames", "0"], "--frames: must be >= 1"),
        (["generate", data, "--stack", stack, "--steps", "0"], "--steps: must be >= 1"),
        (["generate", data, "--stack", stack, "--drop-boxes", "1.5"], "--drop-boxes: must be a probability"),
        (["generate", data, "--stack", stack, "--jitter-boxes", "-1"], "--jitter-boxes: must be an integer >= 0"),
        (["generate", data, "--stack", stack, "--time-shift", "6"], "--time-shift: 6 frames leaves nothing"),
        (["generate", data, "--stack", stack, "--split", "test"], "--split: expected one of"),
        (["generate", str(odd), "--stack", stack], "60x30 is not a multiple of 8"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, capsys):
    for args, needle in _bad_cases(base, tmp_path):
        out = tmp_path / "out"
        capsys.readouterr()
        assert main([*args, "--out", str(out), "--quiet"]) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)
        assert not out.exists(), args
    # an output folder that holds something else is refused and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(_args(base, other)) == 1
    assert "not empty and not a drivesim generate run" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    # the output inside the source dataset is refused
    assert main(_args(base, base["data"] / "gen")) == 1
    assert "would write over the input given as SOURCE" in capsys.readouterr().err
    assert not (base["data"] / "gen").exists()


def test_a_failure_in_the_first_clip_leaves_nothing(base, tmp_path, monkeypatch):
    import drivesim.pipeline.rollout as rollout_mod

    def boom(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) before the first rollout unit is committed

    monkeypatch.setattr(rollout_mod, "rollout_scenario", boom)
    out = tmp_path / "gen"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset([base["data"]], base["stack"], out, steps=1, progress=False)
    assert not out.exists()


def test_clip_seeds_are_distinct_across_nearby_run_seeds():
    seeds = {clip_seed(s, k) for s in range(20) for k in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**53 for s in seeds)
