"""Box fidelity: does a frame show the objects its boxes describe? A reference detector's COCO AP against them.

Protocol (SPEC section 3 "Driving-specific"; GLIGEN / LayoutDiffusion "YOLO score", LayoutBench's shuffled-layout
control): the detector of `drivesim.eval.detector` (trained on real train clips) runs on a set of frames, and its
detections are scored with pycocotools' COCOeval against ground-truth boxes, which are
- the frames' own boxes: for real frames (the upper bound), autoencoder reconstructions (the ceiling of any latent
  model) and generated frames (the conditioning boxes: the number that matters);
- another clip's boxes: generated frames against boxes that did not condition them (the lower bound; near 0 when the
  score comes from the boxes).

AP is reported over all boxes, by COCO size (small < 32^2, medium < 96^2, large, in pixels of the frames), and by
buckets that fit 128x256 driving frames, on sqrt(area): < 8 px, 8-16 px, >= 16 px, and >= 12 px. A ground-truth box
outside a bucket is ignored in that bucket, and so is an unmatched detection outside it (COCOeval's area ranges).
AP averages IoU 0.50:0.05:0.95; AP50 and AP75 are single thresholds; 100 detections per frame.

One module because it is one protocol (frames, boxes, AP buckets, shuffled control, frame change) whose parts are
recorded together in every result.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from drivesim.bbox_conditioning.classes import CLASS_NAMES

AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0 ** 2),
    "medium": (32.0 ** 2, 96.0 ** 2),
    "large": (96.0 ** 2, 1e10),
    "lt8": (0.0, 8.0 ** 2),
    "8to16": (8.0 ** 2, 16.0 ** 2),
    "ge16": (16.0 ** 2, 1e10),
    "ge12": (12.0 ** 2, 1e10),
}
"""Area ranges in pixels^2 (COCOeval's `areaRng`): COCO's sizes and the sqrt(area) buckets of this module."""


@dataclass(frozen=True)
class FrameBoxes:
    """Boxes of one frame: `boxes` (m, 4) float pixels xyxy (image frame), `classes` (m,) int64 class ids,
    `scores` (m,) float in [0, 1] for detections (None for ground truth), `ignore` (m,) bool for ground truth: True
    for a box the generated frame was not conditioned on (COCO's ignore region: neither to find nor background).
    None: no box is ignored."""

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None = None
    ignore: np.ndarray | None = None


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def coco_ap(detections: Sequence[FrameBoxes], ground_truth: Sequence[FrameBoxes]) -> dict[str, dict[str, float | None]]:
    """COCO box AP of `detections` against `ground_truth`, frame by frame (pycocotools COCOeval, iouType "bbox").

    Args:
        detections: per frame, detected boxes with scores (any number; COCOeval keeps the top 100 per frame).
        ground_truth: per frame, the boxes to find; same length as `detections`. Boxes marked `ignore` are
            COCO crowd regions (iscrowd 1): a detection on one is neither a hit nor a false positive, and they are
            not counted in num_gt.

    Returns:
        {bucket: {"AP", "AP50", "AP75", "num_gt"}} for every bucket of `AREA_RANGES`; AP values in [0, 1], None
        where the bucket holds no ground-truth box. Categories without ground truth do not count (COCO's rule).

    Raises:
        ValueError: `detections` and `ground_truth` differ in length.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(ground_truth):
        raise ValueError(f"coco_ap: {len(detections)} frames of detections but {len(ground_truth)} of ground truth")
    images, annotations, results = [], [], []
    for i, (det, gt) in enumerate(zip(detections, ground_truth, strict=True)):
        images.append({"id": i})
        classes = np.asarray(gt.classes).reshape(-1)
        ignore = np.zeros(len(classes), bool) if gt.ignore is None else np.asarray(gt.ignore, bool).reshape(-1)
        for box, cls, crowd in zip(_xywh(gt.boxes), classes, ignore, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(cls) + 1,
                                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(crowd)})
        scores = np.asarray(det.scores, dtype=np.float64).reshape(-1)
        for box, cls, score in zip(_xywh(det.boxes), np.asarray(det.classes).reshape(-1), scores, strict=True):
            results.append([i, *box.tolist(), float(score), int(cls) + 1])
    out: dict[str, dict[str, float | None]] = {}
    gt_area = np.array([a["area"] for a in annotations if not a["iscrowd"]] or [], np.float64)
    num_gt = {name: int(((gt_area >= lo) & (gt_area < hi)).sum()) for name, (lo, hi) in AREA_RANGES.items()}
    if not gt_area.size or not results:
        for name in AREA_RANGES:
            ap = 0.0 if num_gt[name] else None
            out[name] = {"AP": ap, "AP50": ap, "AP75": ap, "num_gt": num_gt[name]}
        return out
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations,
                       "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASS_NAMES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(np.asarray(results, dtype=np.float64))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.areaRng = [list(r) for r in AREA_RANGES.values()]
        ev.params.areaRngLbl = list(AREA_RANGES)
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
    iou = ev.params.iouThrs
    for a, name in enumerate(AREA_RANGES):
        def mean_precision(t: slice | int, a: int = a) -> float | None:
            p = precision[t, :, :, a, -1]
            p = p[p > -1]
            return float(p.mean()) if p.size else None

        out[name] = {"AP": mean_precision(slice(None)), "AP50": mean_precision(int(np.argmin(np.abs(iou - 0.5)))),
                     "AP75": mean_precision(int(np.argmin(np.abs(iou - 0.75)))), "num_gt": num_gt[name]}
    return out


def detections_to_frames(boxes, scores, classes, min_score: float = 0.0) -> list[FrameBoxes]:
    """`BoxDetector.detect` output (tensors (N, K, 4), (N, K), (N, K)) -> per-frame `FrameBoxes` (numpy), keeping
    detections with score > `min_score`."""
    out = []
    for b, s, c in zip(boxes.cpu().numpy(), scores.cpu().numpy(), classes.cpu().numpy(), strict=True):
        keep = s > min_score
        out.append(FrameBoxes(b[keep], c[keep].astype(np.int64), s[keep]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Clip-format datasets: frames and their boxes, detection, the evaluation record
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ClipFrames:
    """Every frame of the chosen clips of a clip-format dataset at the detector's resolution.

    frames: (N, h, w, 3) uint8 RGB; boxes: per frame, `FrameBoxes` in pixels of (h, w); clip_ids: per clip;
    clip_of: (N,) clip index of each frame; frame_of: (N,) frame index within its clip; night: per clip (0/1).
    """

    frames: np.ndarray
    boxes: list[FrameBoxes]
    clip_ids: list[str]
    clip_of: np.ndarray
    frame_of: np.ndarray
    night: list[int]


def load_clip_frames(root, split: str | None, size: tuple[int, int], max_clips: int | None = None) -> ClipFrames:
    """Decode the clips of `split` (all clips when None) of the clip-format dataset `root`, resized to `size` (h, w)
    (OpenCV INTER_AREA when shrinking), with their boxes scaled to it.

    Raises:
        DataError: a bad manifest, annotation or video (named), or no clip in the split.
    """
    from drivesim.bbox_conditioning.classes import CLASS_TO_ID
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.datasets.transforms import resize_frames

    from drivesim.errors import DataError

    manifest = read_manifest(root)
    entries = manifest.clips if split is None else manifest.split(split)
    if max_clips is not None:
        entries = entries[:max_clips]
    if not entries:
        raise DataError(f"{manifest.root / 'manifest.json'}: clips: no clips in split {split!r}")
    frames, boxes, clip_of, frame_of, night, ids = [], [], [], [], [], []
    h, w = size
    for c, entry in enumerate(entries):
        video, ann = load_clip(entry)
        sx, sy = w / ann.width, h / ann.height
        frames.append(resize_frames(video, (h, w)) if video.shape[1:3] != (h, w) else video)
        for k, frame_boxes in enumerate(ann.frames):
            xyxy = np.array([[b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy] for b in frame_boxes], np.float64)
            boxes.append(FrameBoxes(xyxy.reshape(-1, 4), np.array([CLASS_TO_ID[b.cls] for b in frame_boxes],
                                                                   np.int64),
                                    ignore=np.array([not b.conditioned for b in frame_boxes], bool)))
            clip_of.append(c)
            frame_of.append(k)
        night.append(ann.night)
        ids.append(ann.clip_id)
    return ClipFrames(np.concatenate(frames), boxes, ids, np.asarray(clip_of), np.asarray(frame_of), night)


def shuffled_partners(num_clips: int, seed: int) -> np.ndarray:
    """A seeded derangement of clip indices: `partner[i] != i` for every clip (one cycle of a random order), so each
    clip is scored against another clip's boxes (LayoutBench's shuffled-layout control). (num_clips,) int64.

    Raises:
        ValueError: fewer than 2 clips.
    """
    if num_clips < 2:
        raise ValueError("shuffled boxes need at least 2 clips")
    order = np.random.default_rng(seed).permutation(num_clips)
    partner = np.empty(num_clips, np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def boxes_of_partners(data: ClipFrames, partner: np.ndarray) -> list[FrameBoxes]:
    """Ground truth for each frame taken from frame `k mod len` of its partner clip (`partner[clip]`)."""
    by_clip: dict[int, list[FrameBoxes]] = {}
    for i, c in enumerate(data.clip_of):
        by_clip.setdefault(int(c), []).append(data.boxes[i])
    out = []
    for c, k in zip(data.clip_of, data.frame_of, strict=True):
        other = by_clip[int(partner[c])]
        out.append(other[int(k) % len(other)])
    return out


def frames_to_model_input(frames: np.ndarray, device="cpu"):
    """(N, h, w, 3) uint8 -> (N, 3, h, w) float32 in [-1, 1] on `device`."""
    import torch

    return torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def run_detector(detector, frames: np.ndarray, batch_size: int = 32, device="cpu") -> list[FrameBoxes]:
    """Per-frame detections of `detector` (a `BoxDetector`) on (N, h, w, 3) uint8 frames, decoded in batches."""
    out: list[FrameBoxes] = []
    for i in range(0, len(frames), batch_size):
        det = detector.detect(frames_to_model_input(frames[i:i + batch_size], device))
        out.extend(detections_to_frames(*det))
    return out


def load_detector(path, device="cpu"):
    """The `BoxDetector` exported at `path` (a `model/` folder or a training run folder), in eval mode, and the
    sha256 of its weights file (recorded in every result).

    Raises:
        CheckpointError: not a box detector checkpoint (see `drivesim.training.checkpoint.load_model`).
    """
    import hashlib
    from pathlib import Path

    from drivesim.eval.detector import BoxDetector

    from drivesim.training.checkpoint import load_model

    path = Path(path)
    folder = path / "model" if (path / "model" / "config.json").is_file() else path
    model = load_model(folder, BoxDetector, device=device)
    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return model, digest


def evaluate_boxes(detector_path, clips, split: str | None = "val", against=None, against_split: str | None = None,
                   shuffle_seed: int | None = None, max_clips: int | None = None, device="cpu",
                   batch_size: int = 32) -> dict:
    """Box AP of the reference detector on the frames of `clips` (a clip-format dataset).

    Ground truth: the clips' own boxes; or, with `against`, the boxes of the clip with the same id in that
    dataset (frame k against frame k); or, with `shuffle_seed`, the boxes of another clip of `clips`
    (`shuffled_partners`: the control that should score near 0).

    Returns:
        the result record: {"kind": "box_fidelity", "protocol": {detector path and sha256, clips, split, frames,
        clips count, ground truth, IoU thresholds, max detections, size buckets}, "ap": `coco_ap` output}.

    Raises:
        DataError: bad clips, or a clip of `clips` missing from `against`.
        ValueError: both `against` and `shuffle_seed` given.
    """
    from drivesim.errors import DataError

    if against is not None and shuffle_seed is not None:
        raise ValueError("evaluate_boxes: give either against or shuffle_seed, not both")
    detector, digest = load_detector(detector_path, device)
    size = tuple(detector.config.resolution)
    data = load_clip_frames(clips, split, size, max_clips)
    if against is not None:
        other = load_clip_frames(against, against_split, size)
        index = {cid: i for i, cid in enumerate(other.clip_ids)}
        missing = [cid for cid in data.clip_ids if cid not in index]
        if missing:
            raise DataError(f"{against}: clips: no clip {missing[0]!r} (needed to score {clips})")
        partner_boxes = {}
        for i, c in enumerate(other.clip_of):
            partner_boxes.setdefault(int(c), []).append(other.boxes[i])
        gt = []
        for c, k in zip(data.clip_of, data.frame_of, strict=True):
            theirs = partner_boxes[index[data.clip_ids[c]]]
            gt.append(theirs[int(k) % len(theirs)])
        truth = f"boxes of the same clip ids in {against}"
    elif shuffle_seed is not None:
        gt = boxes_of_partners(data, shuffled_partners(len(data.clip_ids), shuffle_seed))
        truth = f"boxes of another clip (shuffled, seed {shuffle_seed})"
    else:
        gt = data.boxes
        truth = "the clips' own boxes"
    dets = run_detector(detector, data.frames, batch_size, device)
    return {
        "kind": "box_fidelity",
        "protocol": {"detector": str(detector_path), "detector_sha256": digest, "clips": str(clips), "split": split,
                     "frames": int(len(data.frames)), "clips_count": len(data.clip_ids), "ground_truth": truth,
                     "resolution": list(size), "iou_thresholds": "0.50:0.05:0.95", "max_detections": 100,
                     "area_ranges_px2": {k: list(v) for k, v in AREA_RANGES.items()}},
        "ap": coco_ap(dets, gt),
    }


# ----------------------------------------------------------------------------------------------------------------
# The four rows together (what `drivesim demo` reports)
# ----------------------------------------------------------------------------------------------------------------


def frame_change(frames: np.ndarray, clip_of: np.ndarray) -> float:
    """Mean |frame[t+1] - frame[t]| on [0, 1] pixels over consecutive frames of the same clip (how much a video
    changes from one frame to the next; a still picture that flickers scores high)."""
    x = frames.astype(np.float32) / 255.0
    same = clip_of[1:] == clip_of[:-1]
    if not same.any():
        return float("nan")
    return float(np.abs(x[1:][same] - x[:-1][same]).mean())


def _subset(data: ClipFrames, every: int) -> ClipFrames:
    keep = np.flatnonzero(data.frame_of % every == 0)
    return ClipFrames(data.frames[keep], [data.boxes[i] for i in keep], data.clip_ids, data.clip_of[keep],
                      data.frame_of[keep], data.night)


def box_fidelity_rows(detector_path, real_dir, generated_dir, autoencoder=None, every: int = 4, seed: int = 0,
                      generated_split: str | None = None, device="cpu") -> dict:
    """The box-fidelity record of a generated clip-format dataset (e.g. `drivesim demo`'s rollouts) beside real val
    clips: AP rows, day/night fidelity and frame-to-frame change.

    Rows (COCO AP of the reference detector by size; every `every`-th frame of each clip):
    "real" (val frames vs their boxes), "autoencoder" (with `autoencoder`, an `AutoencoderKL`: val frames encoded
    to posterior means and decoded), "generated" (generated frames vs their conditioning boxes), "shuffled"
    (generated frames vs another generated clip's boxes; with a single generated clip, vs a real val clip's).
    Day/night: a `DayNightClassifier` fit on real train frames; the share of generated clips whose majority label
    matches their annotation's `night` (and the same on real val clips). Frame change: `frame_change` on every
    frame of the generated and the real val clips, and their ratio (generated / real).

    Raises:
        DataError: bad datasets. CheckpointError: not a detector.
    """
    import torch
    from drivesim.eval.day_night import DayNightClassifier

    detector, digest = load_detector(detector_path, device)
    size = tuple(detector.config.resolution)
    real_all = load_clip_frames(real_dir, "val", size)
    gen_all = load_clip_frames(generated_dir, generated_split, size)
    real, gen = _subset(real_all, every), _subset(gen_all, every)
    rows = {"real": coco_ap(run_detector(detector, real.frames, device=device), real.boxes)}
    if autoencoder is not None:
        rec = []
        with torch.no_grad():
            for i in range(0, len(real.frames), 16):
                x = frames_to_model_input(real.frames[i:i + 16], device)[:, None]
                y = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)[:, 0]
                rec.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        rows["autoencoder"] = coco_ap(run_detector(detector, np.concatenate(rec), device=device), real.boxes)
    dets = run_detector(detector, gen.frames, device=device)
    rows["generated"] = coco_ap(dets, gen.boxes)
    if len(gen.clip_ids) >= 2:
        shuffled_gt = boxes_of_partners(gen, shuffled_partners(len(gen.clip_ids), seed))
        shuffle_note = f"another generated clip's boxes (seeded derangement, seed {seed})"
    else:
        other = real.boxes
        shuffled_gt = [other[i % len(other)] for i in range(len(gen.boxes))]
        shuffle_note = "a real val clip's boxes"
    rows["shuffled"] = coco_ap(dets, shuffled_gt)
    train = load_clip_frames(real_dir, "train", size)
    classifier = DayNightClassifier.fit(train.frames, np.asarray([train.night[c] for c in train.clip_of]))
    day_night = {
        "generated_clips_matching": float((classifier.clip_labels(gen_all.frames, gen_all.clip_of)
                                           == np.asarray(gen_all.night)).mean()),
        "real_val_clips_matching": float((classifier.clip_labels(real_all.frames, real_all.clip_of)
                                          == np.asarray(real_all.night)).mean()),
        "generated_clips": len(gen_all.clip_ids), "real_val_clips": len(real_all.clip_ids)}
    change_gen = frame_change(gen_all.frames, gen_all.clip_of)
    change_real = frame_change(real_all.frames, real_all.clip_of)
    return {
        "kind": "box_fidelity_rows",
        "protocol": {"detector": str(detector_path), "detector_sha256": digest, "real": str(real_dir),
                     "generated": str(generated_dir), "every": every, "resolution": list(size),
                     "frames": {"real": int(len(real.frames)), "generated": int(len(gen.frames))},
                     "shuffled": shuffle_note, "iou_thresholds": "0.50:0.05:0.95", "max_detections": 100,
                     "day_night_classifier": "logistic regression on colour statistics, fit on real train frames"},
        "rows": rows,
        "day_night": day_night,
        "frame_change": {"generated": change_gen, "real": change_real,
                         "ratio": change_gen / change_real if change_real else None},
    }


def draw_boxes(image: np.ndarray, fb: FrameBoxes, colour=(255, 64, 64)) -> np.ndarray:
    """A copy of (h, w, 3) uint8 `image` with 1-pixel outlines of the boxes (pixels xyxy)."""
    out = image.copy()
    h, w = out.shape[:2]
    for x1, y1, x2, y2 in np.asarray(fb.boxes).reshape(-1, 4):
        a, b = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.ceil(x2) - 1, 0, w - 1))
        c, d = int(np.clip(np.floor(y1), 0, h - 1)), int(np.clip(np.ceil(y2) - 1, 0, h - 1))
        out[c, a:b + 1] = colour
        out[d, a:b + 1] = colour
        out[c:d + 1, a] = colour
        out[c:d + 1, b] = colour
    return out


def fidelity_strip(generated_dir, size: tuple[int, int], count: int = 6, seed: int = 0,
                   split: str | None = None) -> np.ndarray:
    """A picture of box fidelity: `count` generated frames spread over the clips of `generated_dir`, with their
    conditioning boxes (top row) and with another clip's boxes (bottom row, the same derangement as the shuffled
    row; with one clip, the boxes of a frame half the clip away). (2 h + 8, count (w + 4), 3) uint8."""
    data = load_clip_frames(generated_dir, split, size)
    if len(data.clip_ids) >= 2:
        other = boxes_of_partners(data, shuffled_partners(len(data.clip_ids), seed))
    else:
        other = [data.boxes[(i + len(data.boxes) // 2) % len(data.boxes)] for i in range(len(data.boxes))]
    picks = np.linspace(0, len(data.frames) - 1, count).round().astype(int)

    def pad(img):
        return np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=255)

    top = np.concatenate([pad(draw_boxes(data.frames[i], data.boxes[i])) for i in picks], axis=1)
    bottom = np.concatenate([pad(draw_boxes(data.frames[i], other[i], (64, 160, 255))) for i in picks], axis=1)
    return np.concatenate([top, bottom], axis=0)
