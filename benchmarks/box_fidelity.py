"""Do the frames follow their boxes? The four box-fidelity rows, PSNR inside boxes, and day/night fidelity.

    python benchmarks/box_fidelity.py --data data/sample --detector runs/det \
        --ae drivesim/pretrained/autoencoder-cpu-small [--image-ldm runs/ldm/model --guidance 1 1.5 2 3] \
        [--every 4] --out benchmarks/results/box_fidelity.json [--strip docs/measurements/box_fidelity.png]

Rows (the reference detector of `drivesim eval train-detector`, trained on the train split; COCO AP with
pycocotools by size, `drivesim.eval.box_fidelity`), on every `--every`-th frame of each val clip:
- real: the val frames against their own boxes (the upper bound);
- autoencoder: the same frames encoded (posterior mean) and decoded (the ceiling of any latent model), with PSNR
  over the frame and inside boxes (by size bucket);
- generated (with `--image-ldm`, per guidance scale): image LDM samples conditioned on each frame's boxes, day/night
  and crowdedness, decoded by the autoencoder, against those boxes;
- shuffled: the same generated frames against the boxes of ANOTHER val clip (a seeded derangement of clips:
  LayoutBench's control; near 0 when the score comes from the boxes).
Day/night fidelity: a logistic-regression classifier on colour statistics fit on real train frames
(`drivesim.eval.day_night`) labels each val clip's generated frames by majority; the share matching the
conditioning label, beside the classifier's accuracy on the real val clips.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from drivesim.eval.box_fidelity import (
    AREA_RANGES,
    FrameBoxes,
    boxes_of_partners,
    coco_ap,
    frames_to_model_input,
    load_clip_frames,
    load_detector,
    run_detector,
    shuffled_partners,
)
from drivesim.eval.day_night import DayNightClassifier

from drivesim.pipeline.sample import draw_boxes, frames_to_uint8, write_png
from drivesim.training.checkpoint import load_model
from drivesim.types import Conditioning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

BUCKETS = ("lt8", "8to16", "ge12", "ge16")


def subset(data, every: int):
    """Keep frames whose index within the clip is a multiple of `every` (in place on a ClipFrames)."""
    keep = np.flatnonzero(data.frame_of % every == 0)
    data.frames = data.frames[keep]
    data.boxes = [data.boxes[i] for i in keep]
    data.clip_of, data.frame_of = data.clip_of[keep], data.frame_of[keep]
    return data


def psnr_by_box(real: np.ndarray, rec: np.ndarray, boxes: list[FrameBoxes]) -> dict:
    """PSNR (dB, pixels in [0, 255]) over whole frames and over the pixels of boxes in each size bucket."""
    err = (real.astype(np.float64) - rec.astype(np.float64)) ** 2
    out = {"frame": float(10 * np.log10(255.0 ** 2 / err.mean()))}
    for name in ("all", *BUCKETS):
        lo, hi = AREA_RANGES[name]
        total, count = 0.0, 0
        for i, fb in enumerate(boxes):
            for x1, y1, x2, y2 in fb.boxes:
                area = (x2 - x1) * (y2 - y1)
                if not lo <= area < hi:
                    continue
                xa, ya, xb, yb = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
                patch = err[i, max(ya, 0):yb, max(xa, 0):xb]
                total += patch.sum()
                count += patch.size
        out[f"boxes_{name}"] = float(10 * np.log10(255.0 ** 2 / (total / count))) if count else None
    return out


def ap_row(ap: dict) -> dict:
    return {k: {m: v[m] for m in ("AP", "AP50", "AP75", "num_gt")} for k, v in ap.items()}


def packed(fb: FrameBoxes, width: int, height: int, max_boxes: int):
    """FrameBoxes (pixels) -> normalised (max_boxes, 4), classes, mask tensors (largest boxes kept)."""
    order = np.argsort(-(fb.boxes[:, 2] - fb.boxes[:, 0]) * (fb.boxes[:, 3] - fb.boxes[:, 1]))[:max_boxes]
    b = np.zeros((max_boxes, 4), np.float32)
    c = np.zeros(max_boxes, np.int64)
    m = np.zeros(max_boxes, bool)
    b[:len(order)] = fb.boxes[order] / np.array([width, height, width, height])
    c[:len(order)] = fb.classes[order]
    m[:len(order)] = True
    return torch.from_numpy(b), torch.from_numpy(c), torch.from_numpy(m)


@torch.no_grad()
def generate(ldm, ae, data, night_of_clip, crowd_of_clip, boxes: list[FrameBoxes], guidance: float, steps: int,
             seed: int, batch: int) -> np.ndarray:
    """Image LDM samples for every frame of `data` conditioned on `boxes` (one per frame) -> (N, h, w, 3) uint8."""
    h, w = data.frames.shape[1:3]
    size = (h // 8, w // 8)
    max_boxes = ldm.config.unet.boxes.max_boxes
    out = []
    for i in range(0, len(boxes), batch):
        sel = range(i, min(i + batch, len(boxes)))
        bx, cl, mk = zip(*(packed(boxes[j], w, h, max_boxes) for j in sel), strict=True)
        clips = [int(data.clip_of[j]) for j in sel]
        cond = Conditioning(boxes=torch.stack(bx)[:, None], classes=torch.stack(cl)[:, None],
                            box_mask=torch.stack(mk)[:, None],
                            night=torch.tensor([night_of_clip[c] for c in clips]),
                            crowdedness=torch.tensor([crowd_of_clip[c] for c in clips]))
        z = ldm.sample(cond, size, steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed + i))
        out.append(frames_to_uint8(ae.decode_scaled(z))[:, 0])
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/sample"))
    ap.add_argument("--detector", type=Path, required=True)
    ap.add_argument("--ae", type=Path, required=True, help="image autoencoder (model folder)")
    ap.add_argument("--image-ldm", type=Path, default=None, help="image LDM model folder (model/ or model-ema/)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=4, help="every N-th frame of each val clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strip", type=Path, default=None, help="PNG: real | autoencoder | generated | shuffled rows")
    ap.add_argument("--fid", action="store_true", help="FID of generated (and reconstructed) frames vs ALL val frames "
                    "(InceptionV3 weights of `drivesim eval weights`)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()

    detector, det_sha = load_detector(args.detector)
    size = tuple(detector.config.resolution)
    data = subset(load_clip_frames(args.data, "val", size), args.every)
    n_clips = len(data.clip_ids)
    partner = shuffled_partners(n_clips, args.seed)
    shuffled_gt = boxes_of_partners(data, partner)
    result: dict = {
        "kind": "box_fidelity_rows",
        "command": "python " + " ".join(sys.argv),
        "protocol": {"data": str(args.data), "split": "val", "frames": int(len(data.frames)), "clips": n_clips,
                     "every": args.every, "detector": str(args.detector), "detector_sha256": det_sha,
                     "resolution": list(size), "iou": "0.50:0.05:0.95", "max_detections": 100,
                     "buckets_sqrt_area_px": {"lt8": "<8", "8to16": "8-16", "ge12": ">=12", "ge16": ">=16"},
                     "shuffle": f"seeded derangement of val clips (seed {args.seed})"},
        "machine": machine(),
    }
    rows = {"real": ap_row(coco_ap(run_detector(detector, data.frames), data.boxes))}
    real_shuffled = ap_row(coco_ap(run_detector(detector, data.frames), shuffled_gt))
    rows["real_vs_shuffled_boxes"] = real_shuffled

    ae = load_model(args.ae)
    rec = []
    for i in range(0, len(data.frames), args.batch):
        x = frames_to_model_input(data.frames[i:i + args.batch])[:, None]
        rec.append(frames_to_uint8(ae.decode(ae.encode(x).mode()).clamp(-1, 1))[:, 0])
    rec = np.concatenate(rec)
    rows["autoencoder"] = ap_row(coco_ap(run_detector(detector, rec), data.boxes))
    fid_ref = None
    if args.fid:
        from drivesim.eval.features import inception_features
        from drivesim.eval.metrics import fid

        fid_ref = inception_features(load_clip_frames(args.data, "val", size).frames)
        result["fid"] = {"reference": f"all {len(fid_ref)} val frames", "autoencoder": fid(fid_ref,
                                                                                        inception_features(rec))}
    result["autoencoder"] = {"path": str(args.ae), "psnr_db": psnr_by_box(data.frames, rec, data.boxes)}
    real50, ae50 = rows["real"]["ge12"]["AP50"], rows["autoencoder"]["ge12"]["AP50"]
    result["autoencoder"]["ceiling_ge12_AP50_ratio"] = (ae50 / real50) if real50 else None

    # day/night classifier on real train frames
    train = load_clip_frames(args.data, "train", size)
    night_train = np.asarray([train.night[c] for c in train.clip_of])
    clf = DayNightClassifier.fit(train.frames, night_train)
    real_clip_labels = clf.clip_labels(data.frames, data.clip_of)
    result["day_night"] = {"classifier": "logistic regression on colour statistics, fit on train frames",
                           "real_val_clip_accuracy": float((real_clip_labels == np.asarray(data.night)).mean())}
    strip_gen = None
    if args.image_ldm is not None:
        from drivesim.datasets.clips import read_annotation, read_manifest

        ldm = load_model(args.image_ldm, "image_ldm")
        anns = {e.clip_id: read_annotation(e.annotation) for e in read_manifest(args.data).split("val")}
        crowd = [anns[c].crowdedness for c in data.clip_ids]
        result["image_ldm"] = {"path": str(args.image_ldm), "steps": args.steps}
        for s in args.guidance:
            t_s = time.time()
            gen = generate(ldm, ae, data, data.night, crowd, data.boxes, s, args.steps, args.seed, args.batch)
            dets = run_detector(detector, gen)
            key = f"guidance_{s:g}"
            rows[f"generated_{key}"] = ap_row(coco_ap(dets, data.boxes))
            rows[f"shuffled_{key}"] = ap_row(coco_ap(dets, shuffled_gt))
            if fid_ref is not None:
                result["fid"][f"generated_{key}"] = fid(fid_ref, inception_features(gen))
            labels = clf.clip_labels(gen, data.clip_of)
            result["day_night"][f"generated_{key}"] = float((labels == np.asarray(data.night)).mean())
            result["image_ldm"][f"seconds_{key}"] = round(time.time() - t_s, 1)
            if strip_gen is None:
                strip_gen = gen
                # the same noise and labels with another clip's boxes, for the picture
                strip_shuf = generate(ldm, ae, data, data.night, crowd, shuffled_gt, s, args.steps, args.seed,
                                      args.batch)
    result["rows"] = rows
    result["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    if args.strip is not None:
        picks = np.linspace(0, len(data.frames) - 1, 6).round().astype(int)
        h, w = size

        def tile(img, fb):
            bx, cl, mk = packed(fb, w, h, 64)
            return np.pad(draw_boxes(img, bx.numpy(), cl.numpy(), mk.numpy()), ((2, 2), (2, 2), (0, 0)),
                          constant_values=255)

        strip_rows = [[tile(data.frames[i], data.boxes[i]) for i in picks],
                      [tile(rec[i], data.boxes[i]) for i in picks]]
        if strip_gen is not None:
            strip_rows.append([tile(strip_gen[i], data.boxes[i]) for i in picks])
            strip_rows.append([tile(strip_shuf[i], shuffled_gt[i]) for i in picks])
        args.strip.parent.mkdir(parents=True, exist_ok=True)
        write_png(np.concatenate([np.concatenate(r, 1) for r in strip_rows], 0), args.strip)

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    print(f"{'row':34s} " + " ".join(f"{b + ' AP50':>12s}" for b in ("all", *BUCKETS)))
    for name, row in rows.items():
        print(f"{name:34s} " + " ".join(f"{fmt(row[b]['AP50']):>12s}" for b in ("all", *BUCKETS)))
    print(json.dumps({k: v for k, v in result.items() if k in ("autoencoder", "day_night", "fid")}, indent=1))


if __name__ == "__main__":
    main()
