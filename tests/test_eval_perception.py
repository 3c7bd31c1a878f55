"""`drivesim eval perception`: the mixing sampler, equal steps, reuse and resume of runs, the record and report, a
learnable fixture on which boxes shuffled against their frames train a detector that finds nothing, and one-line
refusals of bad input."""

import hashlib
import json
import os

import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import Box, ClipAnnotation, write_clip, write_manifest, write_synthetic_dataset
from drivesim.eval.detector import DetectorConfig, fit_detector
from drivesim.eval.perception import (
    SETS,
    LabelledFrames,
    MixedFrames,
    drawn_indices,
    evaluate_perception,
    run_train_config,
)
from torch.utils.data import Dataset

TINY = DetectorConfig(resolution=(32, 64), base_channels=8, channel_mult=(1, 2, 2), output_stride=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real dataset (2 train clips, 2 val clips of 8 frames) and a synthetic one (3 clips, no split chosen)."""
    root = tmp_path_factory.mktemp("perception")
    write_synthetic_dataset(root / "real", clips=4, frames=8, seed=0)
    write_synthetic_dataset(root / "syn", clips=3, frames=8, seed=1)
    return root


# ---- the mixing sampler ----------------------------------------------------------------------------------------


def _drawn_sources(mixed: MixedFrames, seed: int, steps: int = 200, batch: int = 16) -> np.ndarray:
    return mixed.from_synthetic[drawn_indices(len(mixed), batch, seed, steps)]


def test_mixing_ratio_is_honoured_and_deterministic():
    real = [("real", i) for i in range(37)]
    synthetic = [("syn", i) for i in range(23)]
    assert not _drawn_sources(MixedFrames(real, synthetic, 0.0, seed=0), 0).any()  # 3200 draws, none synthetic
    assert _drawn_sources(MixedFrames(real, synthetic, 1.0, seed=0), 0).all()
    half = MixedFrames(real, synthetic, 0.5, seed=0)
    share = _drawn_sources(half, 0).mean()
    assert abs(share - 0.5) < 0.03, share
    quarter = _drawn_sources(MixedFrames(real, synthetic, 0.25, seed=0), 0).mean()
    assert abs(quarter - 0.25) < 0.03, quarter
    # what a slot returns comes from the source the slot names, and every item of each source is used
    items = [half[i] for i in range(len(half))]
    assert all((src == "syn") == bool(flag) for (src, _), flag in zip(items, half.from_synthetic, strict=True))
    assert {i for src, i in items if src == "syn"} == set(range(23))
    assert {i for src, i in items if src == "real"} == set(range(37))
    # deterministic for a seed, different across seeds
    again = MixedFrames(real, synthetic, 0.5, seed=0)
    assert np.array_equal(again.from_synthetic, half.from_synthetic) and np.array_equal(again.item, half.item)
    assert not np.array_equal(MixedFrames(real, synthetic, 0.5, seed=1).from_synthetic, half.from_synthetic)
    with pytest.raises(ValueError):
        MixedFrames(real, synthetic, 1.5, seed=0)
    with pytest.raises(ValueError):
        MixedFrames(real, [], 0.5, seed=0)


class _Recording(Dataset):
    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.seen.append(int(index))
        return self.inner[index]


def test_drawn_indices_are_what_training_draws(tiny, tmp_path):
    # the synthetic share recorded for a mixed run is computed from drawn_indices: it must be the loop's order
    size = TINY.resolution
    mixed = MixedFrames(LabelledFrames(tiny / "real", "train", size), LabelledFrames(tiny / "syn", None, size),
                        0.5, seed=5)
    recording = _Recording(mixed)
    result = fit_detector(recording, tmp_path / "run", TINY, run_train_config(3, 4, seed=5), progress=False)
    assert result.step == 3
    assert recording.seen == drawn_indices(len(mixed), 4, 5, 3).tolist()


def test_boxes_that_did_not_condition_a_generated_frame_are_not_training_labels(tiny, tmp_path):
    import shutil

    syn = tmp_path / "syn"
    shutil.copytree(tiny / "syn", syn)
    ann = json.loads((syn / "clip_0001.json").read_text())
    ann["frames"][2]["boxes"][0]["conditioned"] = False
    (syn / "clip_0001.json").write_text(json.dumps(ann))
    before = LabelledFrames(tiny / "syn", None, TINY.resolution)
    after = LabelledFrames(syn, None, TINY.resolution)
    assert before.dropped_boxes == 0 and after.dropped_boxes == 1
    assert after.num_boxes == before.num_boxes - 1
    assert after.packed[1].box_mask[2].sum() == before.packed[1].box_mask[2].sum() - 1


# ---- the command ---------------------------------------------------------------------------------------------------


def _checkpoint_step(run) -> int:
    steps = sorted((run / "checkpoints").glob("step_*"))
    return json.loads((steps[-1] / "trainer_state.json").read_text())["step"]


def test_cli_end_to_end_equal_steps_and_reuse(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "perception", "--real", str(tiny / "real"), "--synthetic", str(tiny / "syn"), "--out", str(out),
            "--steps", "4", "--seeds", "0", "1", "--batch-size", "4", "--size", "32x64", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(c) real + synthetic" in printed and "perception.json" in printed
    record = json.loads((out / "perception.json").read_text())
    assert record["kind"] == "perception" and list(record["rows"]) == list(SETS)
    for row in record["rows"].values():
        assert row["seeds"] == [0, 1]
        ap50 = row["ap"]["all"]["AP50"]
        assert len(ap50["runs"]) == 2 and isinstance(ap50["mean"], float) and isinstance(ap50["std"], float)
        assert ap50["mean"] == pytest.approx(np.mean(ap50["runs"]))
        assert ap50["std"] == pytest.approx(np.std(ap50["runs"], ddof=1))
    # equal steps: every run's own checkpoint says 4 optimizer steps, whatever the size of its training set
    assert len(record["runs"]) == 6
    for run in record["runs"]:
        folder = out / "runs" / f"{run['set']}-seed{run['seed']}"
        assert run["steps"] == 4 == _checkpoint_step(folder)
    drawn = {r["set"]: r["synthetic_fraction_drawn"] for r in record["runs"]}
    assert drawn["real"] == 0.0 and drawn["synthetic"] == 1.0 and 0.0 < drawn["mixed"] < 1.0
    p = record["protocol"]
    for side in ("real", "synthetic"):
        manifest = tiny / ("real" if side == "real" else "syn") / "manifest.json"
        assert p[side]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert p["steps"] == 4 and p["seeds"] == [0, 1] and p["synthetic_fraction"] == 0.5
    assert p["detector"]["resolution"] == [32, 64] and p["real"]["val_frames"] == 16
    page = (out / "report.html").read_text()
    assert page.count("<img id='examples-") == 3 and "Training a detector on generated data" in page
    assert {f.name for f in (out / "examples").iterdir()} == {f"{s}.png" for s in SETS}

    # run again: every finished run is reused, nothing retrained; stdout carries the JSON record only
    weights = {f: f.stat().st_mtime_ns for f in out.glob("runs/*/model/model.safetensors")}
    scores = {f: f.stat().st_mtime_ns for f in out.glob("runs/*/score.json")}
    assert len(weights) == len(scores) == 6
    assert main([*argv, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(r["reused"] for r in again["runs"])
    assert again["rows"] == record["rows"]
    assert {f: f.stat().st_mtime_ns for f in weights} == weights
    assert {f: f.stat().st_mtime_ns for f in scores} == scores
    # the same folder with another protocol is refused, naming the field
    assert main([*argv[:-1], "--steps", "5"]) == 1
    assert "steps: the runs were made with 4, not 5" in capsys.readouterr().err


def test_an_interrupted_run_resumes_from_its_checkpoint(tiny, tmp_path, monkeypatch):
    from drivesim.training import loop

    out = tmp_path / "out"
    kwargs = dict(steps=6, seeds=[0], batch_size=4, config=TINY, checkpoint_every=2, progress=False)
    real_gradients, calls = loop._gradients, {"n": 0}

    def crash_in_the_second_run(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6 + 5:  # run (a) takes 6 steps; (b) dies in its 5th, after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_gradients(*args, **kw)

    monkeypatch.setattr(loop, "_gradients", crash_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        evaluate_perception(tiny / "real", tiny / "syn", out, **kwargs)
    monkeypatch.setattr(loop, "_gradients", real_gradients)
    finished = out / "runs" / "real-seed0"
    stamp = {f: f.stat().st_mtime_ns for f in (finished / "model" / "model.safetensors", finished / "score.json")}
    assert _checkpoint_step(out / "runs" / "synthetic-seed0") == 4 and not (out / "runs" / "mixed-seed0").exists()

    record = evaluate_perception(tiny / "real", tiny / "syn", out, **kwargs)
    assert [r["reused"] for r in record["runs"]] == [True, False, False]
    assert {f: f.stat().st_mtime_ns for f in stamp} == stamp
    events = [json.loads(line) for line in (out / "runs" / "synthetic-seed0" / "history.jsonl").read_text()
              .splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 4)]
    assert all(r["steps"] == 6 for r in record["runs"])


# ---- a learnable fixture -------------------------------------------------------------------------------------------


def _rectangles(root, clips: int, seed: int, shuffle_boxes: bool = False, with_val: bool = True) -> None:
    """Clips of 4 noisy grey frames with 1-3 rectangles whose colour gives the class (red car, blue truck), each
    annotated with exactly its pixels; with `shuffle_boxes`, every frame carries the boxes of another frame."""
    rng = np.random.default_rng(seed)
    videos, labels = [], []
    for _ in range(clips):
        video = rng.integers(70, 110, (4, 32, 64, 3)).astype(np.uint8)
        frames = []
        for k in range(4):
            boxes = []
            for o in range(int(rng.integers(1, 4))):
                cls = ("car", "truck")[int(rng.integers(0, 2))]
                w, h = int(rng.integers(5, 16)), int(rng.integers(4, 12))
                x, y = int(rng.integers(0, 64 - w)), int(rng.integers(0, 32 - h))
                video[k, y:y + h, x:x + w] = (220, 40, 40) if cls == "car" else (40, 60, 220)
                boxes.append(Box(str(o), cls, float(x), float(y), float(x + w), float(y + h)))
            frames.append(boxes)
        videos.append(video)
        labels += frames
    if shuffle_boxes:
        labels = labels[1:] + labels[:1]
    rows = []
    for c, video in enumerate(videos):
        ann = ClipAnnotation(f"clip_{c:04d}", 10.0, 64, 32, night=0, crowdedness=3, source="test rectangles",
                             frames=labels[4 * c:4 * c + 4])
        write_clip(root, video, ann)
        rows.append((ann.clip_id, "val" if with_val and c % 4 == 3 else "train"))
    write_manifest(root, rows, source="test rectangles", command="_rectangles", seed=seed)


def test_boxes_shuffled_against_their_frames_train_a_detector_that_finds_nothing(tmp_path):
    # 100 steps: (a) scored AP50 0.41-0.50 over seeds 0-4 while (b) stayed <= 0.002 (measured when written)
    _rectangles(tmp_path / "real", 24, seed=3)
    _rectangles(tmp_path / "shuffled", 18, seed=4, shuffle_boxes=True, with_val=False)
    record = evaluate_perception(tmp_path / "real", tmp_path / "shuffled", tmp_path / "out", steps=100, seeds=[0],
                                 batch_size=8, config=TINY, progress=False)
    ap50 = {name: row["ap"]["all"]["AP50"]["mean"] for name, row in record["rows"].items()}
    print(ap50)
    assert ap50["real"] > 0.25 and ap50["synthetic"] < 0.05, ap50
    assert record["comparison"]["synthetic_over_real_ap50"] < 0.2


# ---- bad input -----------------------------------------------------------------------------------------------------


def _no_boxes(root) -> None:
    for c in range(2):
        write_clip(root, np.full((4, 32, 64, 3), 90, np.uint8),
                   ClipAnnotation(f"clip_{c:04d}", 10.0, 64, 32, 0, 0, "test", [[] for _ in range(4)]))
    write_manifest(root, [("clip_0000", "train"), ("clip_0001", "val")], source="test")


BAD = {
    "no val split": (lambda t: write_synthetic_dataset(t / "r", clips=2, frames=8, splits=("train", "train")),
                     ["--real", "{t}/r", "--synthetic", "{syn}"], r"manifest\.json: clips: no clips in split 'val'"),
    "no train split": (lambda t: write_synthetic_dataset(t / "r", clips=2, frames=8, splits=("val", "val")),
                       ["--real", "{t}/r", "--synthetic", "{syn}"], r"no clips in split 'train'"),
    "synthetic without boxes": (_no_boxes, ["--real", "{real}", "--synthetic", "{t}"],
                                r"manifest\.json: all split: no boxes to train a detector on"),
    "zero steps": (None, ["--real", "{real}", "--synthetic", "{syn}", "--steps", "0"], r"--steps: 0; must be >= 1"),
    "fraction 1": (None, ["--real", "{real}", "--synthetic", "{syn}", "--synthetic-fraction", "1"],
                   r"--synthetic-fraction: 1.0; must be strictly between 0 and 1"),
    "repeated seed": (None, ["--real", "{real}", "--synthetic", "{syn}", "--seeds", "1", "1"], r"--seeds: 1 1 repeats"),
    "seed not a number": (None, ["--real", "{real}", "--synthetic", "{syn}", "--seeds", "1", "x"],
                          r"--seeds: 'x' is not an integer"),
    "missing dataset": (None, ["--real", "{t}/nothing", "--synthetic", "{syn}"], r"nothing: --real: no such dataset"),
    "batch larger than the data": (None, ["--real", "{real}", "--synthetic", "{syn}", "--batch-size", "64"],
                                   r"train split: 16 frames, fewer than one batch \(--batch-size 64\)"),
    "synthetic is the real val split": (None, ["--real", "{real}", "--synthetic", "{real}"],
                                        r"--synthetic: is --real itself.*use --synthetic-split train"),
    "size off the stride": (None, ["--real", "{real}", "--synthetic", "{syn}", "--size", "40x64"],
                            r"--size: 40x64; the detector needs multiples of 16"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_in_one_line(name, tiny, tmp_path, capsys):
    import re

    build, args, message = BAD[name]
    if build is not None:
        build(tmp_path)
    args = [a.format(t=tmp_path, real=tiny / "real", syn=tiny / "syn") for a in args]
    before = sorted(tmp_path.rglob("*"))
    # --size before the case's arguments: a case's own --size comes later and wins
    assert main(["eval", "perception", "--size", "32x64", *args, "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: not even the --out folder
    assert not os.path.exists(tmp_path / "out")
