"""Turn a trained reference detector run into the checkpoint drivesim ships (fp16 safetensors + config + card).

    python scripts/ship_detector.py --run runs/det --data data/sample \
        --out drivesim/pretrained/detector-metadrive-sample --train-command "drivesim eval train-detector ..."

The card records the sha256 of the dataset's manifest.json (the demo uses a shipped detector only on the data it
was trained on) and the detector's AP on that dataset's val frames (`drivesim eval boxes`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import torch
from drivesim.eval.box_fidelity import evaluate_boxes
from drivesim.eval.detector import BoxDetector

from drivesim.training.checkpoint import load_model, save_model, trained_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/sample"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-command", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.run / "model", BoxDetector)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_model(model, args.out, state_dict=state)
    record = evaluate_boxes(args.out, args.data, "val")
    card = {
        "name": args.out.name, "model_class": "box_detector",
        "command": args.train_command, "ship_command": shlex.join(["python", *sys.argv]),
        "data": str(args.data), "data_split": "train",
        "data_manifest_sha256": hashlib.sha256((args.data / "manifest.json").read_bytes()).hexdigest(),
        "steps": trained_steps(args.run), "seed": 0, "weights": "model/ of the run (no EMA), cast to float16",
        "measured_on": f"{args.data} val split, {record['protocol']['frames']} frames (drivesim eval boxes)",
        "ap_real_val": {k: {m: v[m] for m in ("AP", "AP50", "AP75", "num_gt")} for k, v in record["ap"].items()},
    }
    a = card["ap_real_val"]
    card["summary"] = (f"AP50 on real val frames: {a['all']['AP50']:.3f} (all), {a['ge16']['AP50']:.3f} (>= 16 px), "
                       f"{a['8to16']['AP50']:.3f} (8-16 px), {a['lt8']['AP50']:.3f} (< 8 px)")
    (args.out / "model_card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
