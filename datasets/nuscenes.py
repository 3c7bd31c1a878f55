"""nuScenes -> drivesim clips: CAM_FRONT frames with 2D boxes projected from the 3D annotations.

Reads a nuScenes release through nuscenes-devkit (`NuScenes`, `view_points`). Expected layout (as the devkit's)::

    DATAROOT/
      VERSION/            category.json attribute.json visibility.json instance.json sensor.json
                          calibrated_sensor.json ego_pose.json log.json scene.json sample.json sample_data.json
                          sample_annotation.json map.json          (VERSION = v1.0-mini, v1.0-trainval, ...)
      samples/CAM_FRONT/*.jpg     key frames (12 Hz camera, annotated at 2 Hz)
      sweeps/CAM_FRONT/*.jpg      intermediate frames (only needed with sweeps=True)
      maps/*.png                  (the devkit checks that the map files exist)

Per frame (a CAM_FRONT sample_data record):

- annotations come from `NuScenes.get_sample_data(..., box_vis_level=BoxVisibility.NONE)`, i.e. moved into the
  camera frame with the ego pose and the calibrated sensor extrinsics; for sweeps the devkit interpolates them
  linearly between the surrounding key frames;
- the 2D box is the pixel-space bounding box of the part of the 3D box in front of the camera: the 8 corners
  with depth >= `NEAR_PLANE_M` plus the points where the box's 12 edges cross the plane z = `NEAR_PLANE_M`,
  projected with the calibrated intrinsic (`view_points(points, K, normalize=True)`). A box entirely behind
  that plane is dropped. A box partly behind the camera therefore gets the exact 2D extent of its visible part
  (dropping only the behind corners would shrink it; projecting them would flip them through the image);
- the box is then mapped through the resize + centre crop to the output size (`cover_crop_*`: scale to cover,
  crop the centre), clipped to the image, and dropped if less than `MIN_BOX_PX` pixels wide or high there;
- class: `category_to_class` (table `CATEGORY_TO_CLASS`); categories it does not map are dropped;
- track id: the instance token's row index in instance.json (an int, stable for a release, shared across clips).

Per clip: T frames sampled at `fps` from one scene (nearest frame in time to a uniform grid; non-overlapping
clips, the scene's tail shorter than T frames is dropped); `night` = 1 when the scene description contains
"night" (case-insensitive); `crowdedness` = number of distinct vehicle instances (`VEHICLE_CLASSES`) with a box
in the clip. Split: the devkit's official train/val (or mini_train/mini_val) scene lists; scenes not listed
there (test scenes, custom releases) go to val when sha1(scene name) % 5 == 0, else train.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from drivesim.bbox_conditioning.classes import CLASS_NAMES, VEHICLE_CLASSES
from drivesim.datasets.clips import Box, ClipAnnotation, Manifest, read_manifest, write_clip, write_manifest
from drivesim.datasets.transforms import cover_crop_boxes, cover_crop_image

from drivesim.errors import ConfigError, DataError

TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
"""The tables nuscenes-devkit's `NuScenes.__init__` loads (all required)."""

NEAR_PLANE_M = 0.1
"""Depth (metres, camera z) of the clipping plane in front of the camera."""

MIN_BOX_PX = 1.0
"""Boxes narrower or lower than this in the output image (pixels) are dropped."""

# Longest matching prefix wins. nuScenes has no "van" class: ambulances are vans, police vehicles mostly cars.
CATEGORY_TO_CLASS: dict[str, str] = {
    "vehicle.car": "car",
    "vehicle.emergency.police": "car",
    "vehicle.emergency.ambulance": "van",
    "vehicle.truck": "truck",
    "vehicle.bus": "bus",
    "vehicle.trailer": "trailer",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.bicycle": "bicycle",
    "human.pedestrian": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "movable_object.barrier": "barrier",
}
"""nuScenes category name (prefix) -> drivesim class. Unmapped and dropped: animal, movable_object.debris,
movable_object.pushable_pullable, static_object.bicycle_rack, vehicle.ego."""
assert set(CATEGORY_TO_CLASS.values()) <= set(CLASS_NAMES)


def category_to_class(category: str) -> str | None:
    """drivesim class of a nuScenes category name (longest prefix in CATEGORY_TO_CLASS), or None if unmapped."""
    best = None
    for prefix, cls in CATEGORY_TO_CLASS.items():
        if (category == prefix or category.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), cls)
    return best[1] if best else None


_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
"""Edges of a devkit `Box.corners()` cuboid (front face 0-3, back face 4-7)."""


def project_box(corners: np.ndarray, intrinsic: np.ndarray, near: float = NEAR_PLANE_M) -> np.ndarray | None:
    """2D extent of the part of a 3D box in front of the camera.

    Args:
        corners: (3, 8) box corners in the camera frame (x right, y down, z forward; metres), in the order of
            nuscenes-devkit `Box.corners()`.
        intrinsic: (3, 3) camera matrix K.
        near: clipping plane depth in metres.

    Returns:
        (4,) float64 xyxy in pixels (not clipped to the image), or None when the whole box is behind `near`.
    """
    from nuscenes.utils.geometry_utils import view_points

    z = corners[2]
    front = z >= near
    if not front.any():
        return None
    points = [corners[:, front]]
    for a, b in _EDGES:
        if front[a] != front[b]:
            t = (near - z[a]) / (z[b] - z[a])
            points.append((corners[:, a] + t * (corners[:, b] - corners[:, a]))[:, None])
    uv = view_points(np.concatenate(points, axis=1), intrinsic, normalize=True)[:2]
    return np.array([uv[0].min(), uv[1].min(), uv[0].max(), uv[1].max()])


@functools.cache
def _official_splits() -> dict[str, set[str]]:
    from nuscenes.utils.splits import create_splits_scenes

    return {k: set(v) for k, v in create_splits_scenes().items()}


def check_tables(dataroot: str | Path, version: str) -> Path:
    """Raise DataError naming the first missing table file (or the version folder); returns the table folder."""
    table_root = Path(dataroot) / version
    if not table_root.is_dir():
        raise DataError(f"{table_root}: nuScenes version: folder not found (expected DATAROOT/{version}/*.json)")
    for name in TABLES:
        if not (table_root / f"{name}.json").is_file():
            raise DataError(f"{table_root / f'{name}.json'}: nuScenes table {name!r}: file not found")
    return table_root


@dataclass
class NuScenesClip:
    """One exported clip: frames (T, h, w, 3) uint8 RGB and its annotation (boxes in output pixels)."""

    frames: np.ndarray
    annotation: ClipAnnotation
    scene: str
    split: str
    sample_data_tokens: list[str]


class NuScenesClips:
    """Clips of T frames at `fps` and `size` from a nuScenes release (see the module docstring for the rules).

    Args:
        dataroot: nuScenes root folder; version: e.g. "v1.0-mini".
        camera: sample_data channel.
        num_frames: frames per clip. fps: output frame rate (<= the source rate: 2 Hz key frames, ~12 Hz with
            sweeps).
        size: (h, w) output resolution. sweeps: also use the non-key-frame camera images (boxes interpolated).
        scenes: scene names to use (default all).

    Raises:
        DataError: missing table / version folder, unreadable table, missing image (names the file).
        ConfigError: fps above the source frame rate, bad sizes.
    """

    def __init__(self, dataroot: str | Path, version: str = "v1.0-mini", camera: str = "CAM_FRONT",
                 num_frames: int = 8, fps: float = 2.0, size: tuple[int, int] = (128, 256), sweeps: bool = False,
                 scenes: list[str] | None = None, verbose: bool = False):
        table_root = check_tables(dataroot, version)
        if num_frames < 1 or fps <= 0 or size[0] <= 0 or size[1] <= 0:
            raise ConfigError(f"num_frames/fps/size must be positive, got {num_frames}, {fps}, {size}")
        from nuscenes.nuscenes import NuScenes

        try:
            self.nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)
        except (AssertionError, KeyError, ValueError, OSError, IndexError) as e:  # devkit asserts on bad releases
            raise DataError(f"{table_root}: nuScenes tables: cannot load ({type(e).__name__}: {e})") from None
        self.dataroot, self.version, self.camera = Path(dataroot), version, camera
        self.num_frames, self.fps, self.size, self.sweeps = num_frames, float(fps), tuple(size), sweeps
        self.scenes = [s for s in self.nusc.scene if scenes is None or s["name"] in scenes]
        if scenes is not None and len(self.scenes) != len(set(scenes)):
            missing = sorted(set(scenes) - {s["name"] for s in self.scenes})
            raise DataError(f"{table_root / 'scene.json'}: name: scenes not found: {', '.join(missing)}")

    # ---- frame selection --------------------------------------------------------------------------------------

    def camera_frames(self, scene: dict) -> list[dict]:
        """The scene's sample_data records of `camera` in time order (key frames only unless sweeps)."""
        sample = self.nusc.get("sample", scene["first_sample_token"])
        if self.camera not in sample["data"]:
            raise DataError(f"{self.dataroot / self.version / 'sample_data.json'}: channel: scene {scene['name']} "
                            f"has no {self.camera} key frame")
        sd = self.nusc.get("sample_data", sample["data"][self.camera])
        while sd["prev"]:  # sweeps may precede the first key frame
            sd = self.nusc.get("sample_data", sd["prev"])
        frames = []
        while True:
            if sd["is_key_frame"] or self.sweeps:
                frames.append(sd)
            if not sd["next"]:
                break
            sd = self.nusc.get("sample_data", sd["next"])
        return frames

    def select_frames(self, records: list[dict]) -> list[list[dict]]:
        """Resample a scene's frames to `fps` (nearest in time) and cut them into clips of num_frames."""
        if len(records) < 2:
            return [[records[0]]] if records and self.num_frames == 1 else []
        times = np.array([r["timestamp"] for r in records], np.float64) * 1e-6
        source_fps = (len(times) - 1) / (times[-1] - times[0])
        if self.fps > source_fps * 1.1:
            raise ConfigError(f"fps: {self.fps} is above the {self.camera} source rate {source_fps:.2f} Hz "
                              f"({'sweeps' if self.sweeps else 'key frames'}; use sweeps=True or a lower fps)")
        grid = np.arange(times[0], times[-1] + 0.5 / self.fps, 1.0 / self.fps)
        picks = np.abs(times[None, :] - grid[:, None]).argmin(axis=1)
        picks = picks[np.concatenate([[True], np.diff(picks) > 0])]  # never repeat a frame
        n = len(picks) // self.num_frames
        return [[records[i] for i in picks[c * self.num_frames:(c + 1) * self.num_frames]] for c in range(n)]

    # ---- boxes ------------------------------------------------------------------------------------------------

    def frame_boxes(self, sd_token: str) -> list[tuple[int, str, np.ndarray]]:
        """(track id, class, xyxy in SOURCE image pixels, unclipped) of every mapped box in front of the camera."""
        from nuscenes.utils.geometry_utils import BoxVisibility

        _, boxes, intrinsic = self.nusc.get_sample_data(sd_token, box_vis_level=BoxVisibility.NONE)
        out = []
        for box in boxes:
            cls = category_to_class(box.name)
            if cls is None:
                continue
            xyxy = project_box(box.corners(), np.asarray(intrinsic))
            if xyxy is None:
                continue
            instance = self.nusc.get("sample_annotation", box.token)["instance_token"]
            out.append((self.nusc.getind("instance", instance), cls, xyxy))
        return out

    def scene_split(self, name: str) -> str:
        """"train" or "val" for a scene name (see the module docstring)."""
        splits = _official_splits()
        if name in splits["val"] or name in splits["mini_val"]:
            return "val"
        if name in splits["train"] or name in splits["mini_train"]:
            return "train"
        return "val" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 5 == 0 else "train"

    # ---- clips ------------------------------------------------------------------------------------------------

    def _image(self, sd: dict) -> np.ndarray:
        path = self.dataroot / sd["filename"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"{path}: image: missing or unreadable (sample_data {sd['token']}.filename)")
        if image.shape[:2] != (sd["height"], sd["width"]):
            raise DataError(f"{path}: width/height: image is {image.shape[1]}x{image.shape[0]} but sample_data "
                            f"{sd['token']} says {sd['width']}x{sd['height']}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def make_clip(self, scene: dict, index: int, records: list[dict]) -> NuScenesClip:
        """Load images and boxes of one clip (records: its sample_data, in time order)."""
        h, w = self.size
        frames, per_frame, vehicles = [], [], set()
        for sd in records:
            frames.append(cover_crop_image(self._image(sd), self.size))
            boxes = []
            for track, cls, xyxy in self.frame_boxes(sd["token"]):
                x1, y1, x2, y2 = cover_crop_boxes(xyxy, (sd["height"], sd["width"]), self.size)
                x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
                if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
                    continue
                boxes.append(Box(str(track), cls, round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)))
                if cls in VEHICLE_CLASSES:
                    vehicles.add(track)
            per_frame.append(boxes)
        clip_id = f"{scene['name']}_{index:03d}"
        night = int("night" in scene["description"].lower())
        ann = ClipAnnotation(clip_id, self.fps, w, h, night, len(vehicles),
                             f"nuScenes {self.version} {self.camera} scene {scene['name']}", per_frame)
        return NuScenesClip(np.stack(frames), ann, scene["name"], self.scene_split(scene["name"]),
                            [r["token"] for r in records])

    def __iter__(self) -> Iterator[NuScenesClip]:
        for scene in self.scenes:
            for i, records in enumerate(self.select_frames(self.camera_frames(scene))):
                yield self.make_clip(scene, i, records)


def export_clips(out_dir: str | Path, dataroot: str | Path, version: str = "v1.0-mini", camera: str = "CAM_FRONT",
                 num_frames: int = 8, fps: float = 2.0, size: tuple[int, int] = (128, 256), sweeps: bool = False,
                 max_clips: int | None = None, command: str = "") -> Manifest:
    """Write nuScenes clips to `out_dir` in the drivesim clip format (built in a temp folder, then renamed).

    Raises:
        DataError: as NuScenesClips; `out_dir` exists and is not empty; no clip could be made.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: output: folder exists and is not empty")
    source = NuScenesClips(dataroot, version, camera, num_frames, fps, size, sweeps)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = []
        for clip in source:
            if max_clips is not None and len(rows) >= max_clips:
                break
            write_clip(tmp, clip.frames, clip.annotation)
            rows.append((clip.annotation.clip_id, clip.split))
        if not rows:
            raise DataError(f"{Path(dataroot) / version / 'scene.json'}: scenes: no scene has {num_frames} "
                            f"{camera} frames at {fps} fps")
        write_manifest(tmp, rows, source=f"nuScenes {version} {camera}", command=command,
                       nuscenes={"version": version, "camera": camera, "num_frames": num_frames, "fps": fps,
                                 "size": list(size), "sweeps": sweeps})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(out)
