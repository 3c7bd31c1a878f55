"""Scenarios: from a clip, JSON round trip, resample / extend / window, tensors, and the `drivesim scenario` CLI."""

import json

import pytest
import torch
from drivesim.bbox_conditioning.classes import CLASS_TO_ID
from drivesim.cli.main import main
from drivesim.datasets import scenario as sc
from drivesim.datasets.clips import Box, ClipAnnotation, read_annotation, write_synthetic_dataset

from drivesim.errors import DataError


def _scenario(frames, fps=10.0, width=100, height=50, night=0, crowdedness=1):
    return sc.Scenario(fps, width, height, night, crowdedness,
                       [[Box(str(t), c, *xyxy) for t, c, xyxy in f] for f in frames], source="test")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("scn") / "ds"
    write_synthetic_dataset(root, clips=3, frames=5, size=(32, 64), splits=("train", "val", "train"))
    return root


def test_from_clip_and_json_round_trip(ds, tmp_path):
    ann = read_annotation(ds / "clip_0001.json")
    s = sc.Scenario.from_clip(ann)
    assert (s.fps, s.width, s.height, s.night, s.crowdedness) == (ann.fps, 64, 32, ann.night, ann.crowdedness)
    assert s.frames == ann.frames and s.num_frames == 5 and s.duration_s == pytest.approx(0.5)
    path = sc.save_scenario(s, tmp_path / "sub" / "s.json")
    data = json.loads(path.read_text())
    assert data["format"] == "drivesim-scenario" and data["format_version"] == 1 and data["num_frames"] == 5
    back = sc.load_scenario(path)
    assert back.frames == s.frames and back.fps == s.fps and back.notes == []
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]  # no temp file left


def test_load_clips_partially_outside_boxes_with_a_note(tmp_path):
    s = _scenario([[("1", "car", (-10.0, 5.0, 20.0, 60.0))]])
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s.to_json()))
    back = sc.load_scenario(path)
    b = back.frames[0][0]
    assert (b.x1, b.y1, b.x2, b.y2) == (0.0, 5.0, 20.0, 50.0)
    assert len(back.notes) == 1 and "frames[0].boxes[0]: clipped" in back.notes[0]


def test_duplicate_track_id_in_a_frame_is_an_error(tmp_path):
    s = _scenario([[("1", "car", (0, 0, 10, 10)), ("1", "bus", (20, 0, 30, 10))]])
    path = tmp_path / "s.json"
    path.write_text(json.dumps(s.to_json()))
    with pytest.raises(DataError, match=r"s\.json: frames\[0\]\.boxes\[1\]\.track_id: duplicate track id '1'"):
        sc.load_scenario(path)


def test_resample_linear_interpolates_tracks_and_handles_appear_disappear():
    # track 1 moves 10 px / frame over 3 frames; track 2 only in frame 0; track 3 appears in frame 2
    s = _scenario([
        [("1", "car", (0, 0, 10, 10)), ("2", "bus", (50, 0, 60, 10))],
        [("1", "car", (10, 0, 20, 10))],
        [("1", "car", (20, 0, 30, 10)), ("3", "truck", (70, 20, 90, 40))],
    ], fps=10.0)
    r = sc.resample(s, 40.0)
    assert r.num_frames == 12 and r.fps == 40.0
    # frame j is at source position j / 4
    f1 = {b.track_id: b for b in r.frames[1]}  # s = 0.25: nearest is frame 0, track 2 kept as is
    assert set(f1) == {"1", "2"}
    assert (f1["1"].x1, f1["1"].x2) == pytest.approx((2.5, 12.5)) and f1["2"].x1 == 50
    f2 = {b.track_id: b for b in r.frames[2]}  # s = 0.5: nearest (half up) is frame 1: track 2 is gone
    assert set(f2) == {"1"} and f2["1"].x1 == pytest.approx(5.0)
    f7 = {b.track_id: b for b in r.frames[7]}  # s = 1.75: nearest frame 2: track 3 appears with its own box
    assert set(f7) == {"1", "3"} and f7["1"].x1 == pytest.approx(17.5) and f7["3"].x1 == 70
    assert [b.track_id for b in r.frames[11]] == ["1", "3"] and r.frames[11][0].x1 == 20  # held past the end
    n = sc.resample(s, 40.0, method="nearest")
    assert n.frames[1] == s.frames[0] and n.frames[2] == s.frames[1]
    down = sc.resample(s, 5.0)
    assert down.num_frames == 2 and down.frames[0] == s.frames[0] and down.frames[1] == s.frames[2]


def test_resample_rejects_bad_rate():
    with pytest.raises(ValueError, match="fps must be a positive"):
        sc.resample(_scenario([[]]), 0.0)


def test_extend_loop_offsets_track_ids_per_loop():
    s = _scenario([[("3", "car", (0, 0, 10, 10))], [("3", "car", (1, 0, 11, 10)), ("7", "bus", (40, 0, 60, 9))]])
    e = sc.extend(s, 5, "loop")
    assert e.num_frames == 5
    assert [[b.track_id for b in f] for f in e.frames] == [["3"], ["3", "7"], ["11"], ["11", "15"], ["19"]]
    assert [b.x1 for f in e.frames for b in f] == [0, 1, 40, 0, 1, 40, 0]  # hard restart: same boxes each loop


def test_extend_chain_concatenates_and_namespaces_non_integer_ids():
    a = _scenario([[("a", "car", (0, 0, 10, 10))]] * 2, crowdedness=1)
    b = _scenario([[("a", "bus", (5, 5, 20, 20))]], crowdedness=4)
    e = sc.extend([a, b], 5, "chain")
    assert [f[0].track_id for f in e.frames] == ["0:a", "0:a", "1:a", "2:a", "2:a"]
    assert [f[0].cls for f in e.frames] == ["car", "car", "bus", "car", "car"]
    assert e.crowdedness == 4
    with pytest.raises(ValueError, match="night"):
        sc.extend([a, _scenario([[]], night=1)], 4, "chain")
    with pytest.raises(ValueError, match="loop replays one scenario"):
        sc.extend([a, b], 4, "loop")


def test_window_and_to_tensors():
    s = _scenario([[("5", "car", (0, 0, 50, 25))], [], [("9", "pedestrian", (10, 10, 20, 50)),
                                                      ("5", "car", (50, 25, 100, 50))]], night=1, crowdedness=3)
    w = sc.window(s, 1, 2)
    assert w.frames == s.frames[1:3]
    with pytest.raises(ValueError, match="not inside"):
        sc.window(s, 2, 2)
    cond = sc.to_tensors(s, 1, 2, max_boxes=3)
    assert cond.boxes.shape == (1, 2, 3, 4) and cond.boxes.dtype == torch.float32
    assert cond.classes.shape == (1, 2, 3) and cond.box_mask.dtype == torch.bool
    assert cond.night.tolist() == [1] and cond.crowdedness.tolist() == [3]
    assert cond.box_mask[0].tolist() == [[False] * 3, [True, True, False]]
    # slot order: larger box first (car 50x25 before pedestrian 10x40)
    assert torch.allclose(cond.boxes[0, 1, 0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(cond.boxes[0, 1, 1], torch.tensor([0.1, 0.2, 0.2, 1.0]))
    assert cond.classes[0, 1, :2].tolist() == [CLASS_TO_ID["car"], CLASS_TO_ID["pedestrian"]]
    # track ids are numbered over the whole scenario, so "5" keeps id 0 in every window
    assert sc.pack(s, 1, 2, 3).track_ids[1].tolist() == [0, 1, -1]


def test_cli_from_clip_validate_info(ds, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["scenario", "from-clip", f"{ds}:clip_0001", "--out", str(out)]) == 0
    assert sc.load_scenario(out).frames == read_annotation(ds / "clip_0001.json").frames
    assert main(["scenario", "from-clip", str(ds / "clip_0002.json"), "--out", str(out), "--overwrite"]) == 0
    assert sc.load_scenario(out).frames == read_annotation(ds / "clip_0002.json").frames
    capsys.readouterr()
    assert main(["scenario", "validate", str(out)]) == 0
    assert "ok (5 frames" in capsys.readouterr().out
    assert main(["scenario", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_frames"] == 5 and info["tracks"] == 1 and info["width"] == 64


def test_cli_from_clip_minutes_loop_and_chain(ds, tmp_path):
    out = tmp_path / "long.json"
    assert main(["scenario", "from-clip", str(ds), "--out", str(out), "--fps", "20", "--minutes", "0.5",
                 "--extend", "loop"]) == 0
    s = sc.load_scenario(out)
    assert s.fps == 20 and s.num_frames == 600
    first = read_annotation(ds / "clip_0000.json")
    assert len(set(b.track_id for f in s.frames for b in f)) == 60  # 1 track x 60 loops of 10 frames
    assert s.frames[0][0].x1 == first.frames[0][0].x1
    # clips 0 and 2 are day (synthetic night = clip index % 2): chain uses them and skips the night clip
    assert main(["scenario", "from-clip", str(ds), "--out", str(out), "--minutes", "0.05", "--extend",
                 "chain", "--overwrite"]) == 0
    s = sc.load_scenario(out)
    c2 = read_annotation(ds / "clip_0002.json")
    assert s.num_frames == 30 and s.night == 0
    assert [b.x1 for b in s.frames[5]] == [b.x1 for b in c2.frames[0]]


def test_clip_annotation_from_scenario_frames_is_the_same_box_type():
    # the clip format's reader accepts a scenario's frames as they are (rollouts write boxes from the scenario)
    s = _scenario([[("1", "car", (0, 0, 10, 10))]])
    ann = ClipAnnotation("x", s.fps, s.width, s.height, s.night, s.crowdedness, "rollout", s.frames)
    assert sc.Scenario.from_clip(ann).frames == s.frames
