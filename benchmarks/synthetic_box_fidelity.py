"""Where a generated dataset's labels are in its pictures: the reference detector's AP50 on generated clips against
their own (conditioning) boxes, by box size and by day/night, beside the same on real clips.

    python benchmarks/synthetic_box_fidelity.py --generated runs/gen_train --real data/sample \
        --detector drivesim/pretrained/detector-metadrive-sample --out synthetic_box_fidelity

A perception team's detector trained on generated clips learns what their labels show: a label whose object is not
in the frame teaches it to ignore such objects. This splits the box fidelity of `drivesim eval boxes` (one number
per size bucket) by the clips' `night` label as well, for the generated set (all its clips) and for the real val
split (the upper bound). Rows: real val, generated; columns: all boxes, < 8 px, 8-16 px, >= 16 px (sqrt of area at
the detector's 128x256), each for all / day / night clips. Writes benchmarks/results/<out>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import machine, table, write_result

BUCKETS = ("all", "lt8", "8to16", "ge16")


def fidelity(detector_path: Path, clips: Path, split: str | None) -> dict:
    """{"all" | "day" | "night": {bucket: {"AP50", "num_gt"}}, "clips": {...}} of one clip-format dataset."""
    from drivesim.eval.box_fidelity import coco_ap, load_clip_frames, load_detector, run_detector

    detector, _ = load_detector(detector_path)
    data = load_clip_frames(clips, split, tuple(detector.config.resolution))
    detections = run_detector(detector, data.frames)
    night = np.asarray(data.night)[data.clip_of].astype(bool)
    out = {"clips": {"all": len(data.clip_ids), "night": int(np.sum(data.night)),
                     "day": len(data.clip_ids) - int(np.sum(data.night))}}
    for name, keep in (("all", np.ones_like(night)), ("day", ~night), ("night", night)):
        idx = np.flatnonzero(keep)
        if idx.size == 0:
            out[name] = None
            continue
        ap = coco_ap([detections[i] for i in idx], [data.boxes[i] for i in idx])
        out[name] = {b: {"AP50": ap[b]["AP50"], "num_gt": ap[b]["num_gt"]} for b in BUCKETS}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generated", type=Path, required=True, help="generated clip-format dataset (all its clips)")
    ap.add_argument("--real", type=Path, default=Path("data/sample"), help="real dataset (its val split)")
    ap.add_argument("--detector", type=Path, default=Path("drivesim/pretrained/detector-metadrive-sample"))
    ap.add_argument("--out", default="synthetic_box_fidelity", help="result name under benchmarks/results/")
    args = ap.parse_args(argv)

    from drivesim.eval.box_fidelity import load_detector

    _, digest = load_detector(args.detector)
    rows = {"real_val": fidelity(args.detector, args.real, "val"),
            "generated": fidelity(args.detector, args.generated, None)}
    result = {"benchmark": "synthetic_box_fidelity",
              "command": "python benchmarks/synthetic_box_fidelity.py " + " ".join(argv if argv is not None else
                                                                                  sys.argv[1:]),
              "protocol": {"detector": str(args.detector), "detector_sha256": digest, "real": str(args.real),
                           "real_split": "val", "generated": str(args.generated), "generated_split": "all",
                           "ground_truth": "each clip's own boxes (the conditioning boxes for generated clips)",
                           "buckets_sqrt_area_px": {"lt8": "<8", "8to16": "8-16", "ge16": ">=16"},
                           "iou": "AP50 (COCO, pycocotools)"},
              "rows": rows, "machine": machine()}
    write_result(args.out, result)
    table_rows = []
    for name, rec in rows.items():
        for part in ("all", "day", "night"):
            r = rec[part]
            if r is None:
                continue
            table_rows.append([f"{name} ({part}, {rec['clips'][part]} clips)",
                               *[f"{r[b]['AP50']:.3f} ({r[b]['num_gt']})" if r[b]["AP50"] is not None else "-"
                                 for b in BUCKETS]])
    table("box AP50 against each clip's own boxes (number of boxes)", ["clips", *BUCKETS], table_rows)
    return result


if __name__ == "__main__":
    main()
