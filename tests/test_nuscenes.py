"""nuScenes adapter on a miniature release built on disk; projected boxes checked against an independent pinhole
projection written here (own quaternion rotation, own frame chain, dense edge sampling instead of near-plane
clipping)."""

import json
import math

import cv2
import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import read_manifest
from drivesim.datasets.nuscenes import NuScenesClips, category_to_class, export_clips
from drivesim.datasets.torch_data import ClipDataset
from drivesim.datasets.validate import validate_dataset

from drivesim.errors import ConfigError, DataError

W, H = 160, 90  # source images (nuScenes is 1600x900)
OUT = (32, 64)  # output (h, w): scale 0.4 -> 64x36, centre crop drops 2 rows at the top
K = [[100.0, 0.0, 80.0], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]]
CAM_T = [1.5, 0.0, 1.5]
CAM_Q = list(np.array([0.5, -0.49, 0.51, -0.5]) / np.linalg.norm([0.5, -0.49, 0.51, -0.5]))
T0 = 1_533_000_000_000_000
VERSION = "v1.0-tiny"


def yaw_q(yaw):
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def quat_to_matrix(q):
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


# objects: name -> (category, size [w, l, h], yaw, centre at key frame k (world))
OBJECTS = {
    "car_ahead": ("vehicle.car", [1.8, 4.5, 1.6], 0.3, lambda k: [25.0 + k, 1.0, 0.8]),
    "ped": ("human.pedestrian.adult", [0.6, 0.6, 1.8], 0.0, lambda k: [15.0, 3.0, 0.9]),  # behind at k = 3
    "truck_behind": ("vehicle.truck", [2.5, 8.0, 3.0], 0.0, lambda k: [-10.0 + 5 * k, 0.0, 1.5]),
    "bus_beside": ("vehicle.bus.rigid", [2.5, 12.0, 3.0], 0.0, lambda k: [5.0 * k + 1.5, -4.0, 1.5]),
    "dog": ("animal", [0.4, 0.8, 0.6], 0.0, lambda k: [20.0, 0.0, 0.3]),
    "car_right": ("vehicle.emergency.police", [1.8, 4.5, 1.6], 0.0, lambda k: [20.0 + 5 * k, -12.0, 0.8]),
}


def ego_pose(k_time):
    """Ego moves 10 m/s along x with a slow yaw; k_time in key-frame units (0.5 s)."""
    return [5.0 * k_time, 0.2 * k_time, 0.0], yaw_q(0.02 * k_time)


def build_release(root):
    """Two scenes: 'scene-day' (4 key frames + 1 sweep between key frames 1 and 2), 'scene-night' (2 key frames)."""
    t = {name: [] for name in ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                               "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")}
    t["attribute"].append({"token": "attr0", "name": "vehicle.moving", "description": ""})
    t["visibility"].append({"token": "4", "level": "v80-100", "description": ""})
    t["sensor"].append({"token": "sens_cam", "channel": "CAM_FRONT", "modality": "camera"})
    t["calibrated_sensor"].append({"token": "cs_cam", "sensor_token": "sens_cam", "translation": CAM_T,
                                   "rotation": CAM_Q, "camera_intrinsic": K})
    t["log"].append({"token": "log0", "logfile": "log0", "vehicle": "v", "date_captured": "2018-08-01",
                     "location": "singapore-onenorth"})
    t["map"].append({"token": "map0", "log_tokens": ["log0"], "category": "semantic_prior",
                     "filename": "maps/map0.png"})
    (root / "maps").mkdir(parents=True)
    cv2.imwrite(str(root / "maps" / "map0.png"), np.zeros((4, 4), np.uint8))
    cats = {}
    for cat, *_rest in OBJECTS.values():
        if cat not in cats:
            cats[cat] = f"cat_{len(cats)}"
            t["category"].append({"token": cats[cat], "name": cat, "description": ""})

    def add_image(filename, value):
        path = root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((H, W, 3), value, np.uint8))

    def add_scene(name, description, n_keys, sweep_after=None, objects=OBJECTS):
        samples = [f"{name}_s{k}" for k in range(n_keys)]
        t["scene"].append({"token": name, "log_token": "log0", "nbr_samples": n_keys, "name": name,
                           "description": description, "first_sample_token": samples[0],
                           "last_sample_token": samples[-1]})
        sds = []  # (token, time in key-frame units, sample index, is key)
        for k in range(n_keys):
            if sweep_after is not None and k == sweep_after + 1:
                sds.append((f"{name}_sweep", sweep_after + 0.5, k, False))
            sds.append((f"{name}_sd{k}", float(k), k, True))
        for k, s in enumerate(samples):
            t["sample"].append({"token": s, "timestamp": T0 + k * 500_000, "scene_token": name,
                                "prev": samples[k - 1] if k else "", "next": samples[k + 1] if k + 1 < n_keys else ""})
        for i, (tok, kt, k, key) in enumerate(sds):
            translation, rotation = ego_pose(kt)
            t["ego_pose"].append({"token": f"ep_{tok}", "timestamp": T0 + int(kt * 500_000),
                                  "translation": translation, "rotation": rotation})
            folder = "samples" if key else "sweeps"
            filename = f"{folder}/CAM_FRONT/{tok}.jpg"
            add_image(filename, 40 + 40 * i)
            t["sample_data"].append({
                "token": tok, "sample_token": samples[k], "ego_pose_token": f"ep_{tok}",
                "calibrated_sensor_token": "cs_cam", "timestamp": T0 + int(kt * 500_000), "fileformat": "jpg",
                "is_key_frame": key, "height": H, "width": W, "filename": filename,
                "prev": sds[i - 1][0] if i else "", "next": sds[i + 1][0] if i + 1 < len(sds) else ""})
        for obj in objects:
            cat, size, yaw, centre = OBJECTS[obj]
            inst = f"{name}_{obj}"
            anns = [f"{inst}_a{k}" for k in range(n_keys)]
            t["instance"].append({"token": inst, "category_token": cats[cat], "nbr_annotations": n_keys,
                                  "first_annotation_token": anns[0], "last_annotation_token": anns[-1]})
            for k, a in enumerate(anns):
                t["sample_annotation"].append({
                    "token": a, "sample_token": samples[k], "instance_token": inst, "visibility_token": "4",
                    "attribute_tokens": [], "translation": centre(k), "size": size, "rotation": yaw_q(yaw),
                    "prev": anns[k - 1] if k else "", "next": anns[k + 1] if k + 1 < n_keys else "",
                    "num_lidar_pts": 10, "num_radar_pts": 0})

    add_scene("scene-day", "Sunny, busy intersection, peds", 4, sweep_after=1)
    add_scene("scene-night", "Night, rain, parked cars", 2, objects=["car_ahead"])
    (root / VERSION).mkdir()
    for name, rows in t.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    return t


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes")
    tables = build_release(root)
    return root, tables


def expected_box(obj, centre, kt):
    """Independent 2D box (output pixels, clipped) of an object, or None if not visible / behind the camera."""
    _, (w, length, h), yaw, _ = OBJECTS[obj]
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    local = signs * [length / 2, w / 2, h / 2]
    world = local @ quat_to_matrix(yaw_q(yaw)).T + centre
    et, eq = ego_pose(kt)
    ego = (world - et) @ quat_to_matrix(eq)  # R^T (p - t) for row vectors
    cam = (ego - CAM_T) @ quat_to_matrix(CAM_Q)
    # dense samples along the 12 edges (pairs of corners differing in one sign), keep depth >= 0.1 m
    pts = []
    for i in range(8):
        for j in range(i + 1, 8):
            if np.abs(signs[i] - signs[j]).sum() == 2:
                s = np.linspace(0, 1, 4001)[:, None]
                pts.append(cam[i] + s * (cam[j] - cam[i]))
    pts = np.concatenate(pts)
    pts = pts[pts[:, 2] >= 0.1]
    if not len(pts):
        return None
    u = K[0][0] * pts[:, 0] / pts[:, 2] + K[0][2]
    v = K[1][1] * pts[:, 1] / pts[:, 2] + K[1][2]
    scale, y0 = 0.4, (H * 0.4 - OUT[0]) / 2
    x1, x2 = np.clip([u.min() * scale, u.max() * scale], 0, OUT[1])
    y1, y2 = np.clip([v.min() * scale - y0, v.max() * scale - y0], 0, OUT[0])
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return np.array([x1, y1, x2, y2])


def test_category_mapping():
    assert category_to_class("vehicle.car") == "car"
    assert category_to_class("vehicle.bus.bendy") == "bus"
    assert category_to_class("human.pedestrian.police_officer") == "pedestrian"
    assert category_to_class("vehicle.emergency.ambulance") == "van"
    assert category_to_class("movable_object.trafficcone") == "traffic_cone"
    assert category_to_class("animal") is None and category_to_class("movable_object.debris") is None
    assert category_to_class("vehicle.carriage") is None  # prefixes match whole name components


def test_keyframe_clips_match_independent_projection(release):
    root, tables = release
    instance_index = {row["token"]: i for i, row in enumerate(tables["instance"])}
    clips = list(NuScenesClips(root, VERSION, num_frames=2, fps=2.0, size=OUT))
    assert [c.annotation.clip_id for c in clips] == ["scene-day_000", "scene-day_001", "scene-night_000"]
    assert [c.annotation.night for c in clips] == [0, 0, 1]
    seen_behind_drop, compared = False, 0
    for clip, keys in zip(clips, [(0, 1), (2, 3), (0, 1)], strict=True):
        scene = clip.scene
        assert clip.frames.shape == (2, *OUT, 3)
        assert clip.sample_data_tokens == [f"{scene}_sd{k}" for k in keys]
        vehicles = set()
        for frame_boxes, k in zip(clip.annotation.frames, keys, strict=True):
            got = {b.track_id: b for b in frame_boxes}
            objs = OBJECTS if scene == "scene-day" else {"car_ahead": OBJECTS["car_ahead"]}
            for obj, (cat, _, _, centre) in objs.items():
                track = str(instance_index[f"{scene}_{obj}"])
                exp = expected_box(obj, np.array(centre(k)), float(k))
                if category_to_class(cat) is None or exp is None:
                    assert track not in got, (obj, k)
                    seen_behind_drop |= obj == "ped" and k == 3
                    continue
                b = got.pop(track)
                assert b.cls == category_to_class(cat)
                np.testing.assert_allclose([b.x1, b.y1, b.x2, b.y2], exp, atol=0.02, err_msg=f"{obj} k={k}")
                compared += 1
                if obj != "ped":
                    vehicles.add(track)
            assert not got, f"unexpected boxes {got}"
        assert clip.annotation.crowdedness == len(vehicles)
    assert compared >= 14, compared
    assert seen_behind_drop, "the pedestrian passed behind the camera at key frame 3 and must be dropped"
    # the bus spans the camera plane: kept, with its visible part running off the right image edge
    bus = [b for b in clips[0].annotation.frames[0] if b.cls == "bus"]
    assert len(bus) == 1 and bus[0].x2 == OUT[1]
    # frames come in time order (each source image has its own grey level)
    assert clips[0].frames[0].mean() < clips[0].frames[1].mean()


def test_sweeps_interpolate_boxes(release):
    root, tables = release
    src = NuScenesClips(root, VERSION, num_frames=5, fps=2.6, size=OUT, sweeps=True, scenes=["scene-day"])
    (clip,) = list(src)
    assert clip.sample_data_tokens[2] == "scene-day_sweep"
    track = str([r["token"] for r in tables["instance"]].index("scene-day_car_ahead"))
    (b,) = [b for b in clip.annotation.frames[2] if b.track_id == track]
    centre = (np.array(OBJECTS["car_ahead"][3](1)) + OBJECTS["car_ahead"][3](2)) / 2  # linear, same yaw
    np.testing.assert_allclose([b.x1, b.y1, b.x2, b.y2], expected_box("car_ahead", centre, 1.5), atol=0.02)


def test_fps_above_source_rate_is_refused(release):
    root, _ = release
    with pytest.raises(ConfigError, match="fps: 10.0 is above the CAM_FRONT source rate"):
        list(NuScenesClips(root, VERSION, num_frames=2, fps=10.0, size=OUT))


def test_export_clip_format_and_cli(release, tmp_path, capsys):
    root, _ = release
    manifest = export_clips(tmp_path / "out", root, VERSION, num_frames=2, fps=2.0, size=OUT)
    assert len(manifest.clips) == 3
    report = validate_dataset(tmp_path / "out")
    assert report.ok, report.problems
    split = manifest.clips[0].split
    ds = ClipDataset(tmp_path / "out", split, num_frames=2, max_boxes=8)
    assert ds[0]["frames"].shape == (2, 3, *OUT)
    rc = main(["data", "from-nuscenes", "--dataroot", str(root), "--version", VERSION, "--out",
               str(tmp_path / "cli"), "--frames", "2", "--fps", "2", "--size", "32x64"])
    assert rc == 0, capsys.readouterr()
    assert "wrote 3 clips" in capsys.readouterr().out
    assert "from-nuscenes" in read_manifest(tmp_path / "cli").meta["command"]
    # refusing to overwrite leaves the existing export intact
    assert main(["data", "from-nuscenes", "--dataroot", str(root), "--version", VERSION, "--out",
                 str(tmp_path / "cli")]) == 1
    assert "output: folder exists and is not empty" in capsys.readouterr().err


def test_missing_table(release, tmp_path):
    root, _ = release
    import shutil

    copy = tmp_path / "nus"
    shutil.copytree(root, copy)
    (copy / VERSION / "sample_annotation.json").unlink()
    with pytest.raises(DataError, match=r"v1\.0-tiny/sample_annotation\.json: nuScenes table 'sample_annotation'"):
        NuScenesClips(copy, VERSION)
    with pytest.raises(DataError, match=r"v1\.0-nope: nuScenes version: folder not found"):
        NuScenesClips(copy, "v1.0-nope")
    assert not (tmp_path / "out").exists()


def test_missing_image(release, tmp_path):
    root, _ = release
    import shutil

    copy = tmp_path / "nus"
    shutil.copytree(root, copy)
    (copy / "samples" / "CAM_FRONT" / "scene-day_sd1.jpg").unlink()
    with pytest.raises(DataError, match=r"scene-day_sd1\.jpg: image: missing or unreadable"):
        export_clips(tmp_path / "out", copy, VERSION, num_frames=2, fps=2.0, size=OUT)
    assert list(tmp_path.iterdir()) == [copy]  # no partial export
