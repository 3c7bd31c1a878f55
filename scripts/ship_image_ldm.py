"""Turn a trained image LDM run into the checkpoint drivesim ships (fp16 safetensors + config + model card).

    python scripts/ship_image_ldm.py --run runs/ldm_long --ae drivesim/pretrained/autoencoder-cpu-small \
        --measured benchmarks/results/box_fidelity.json --out drivesim/pretrained/image-ldm-cpu-small \
        --train-command "drivesim train image_ldm ..."

The card records the sha256 of the autoencoder it ships with and was measured through, and the box-fidelity rows
measured by `benchmarks/box_fidelity.py` (`--measured`). Which latents it was trained on is its config's
`encoder_id` (the encoder's identity): the demo uses the image LDM with an autoencoder of that encoder, so a
decoder-only fine-tune of the autoencoder keeps it valid (re-ship to re-measure through the new decoder). A run
fine-tuned from another (`drivesim train --init-from RUN/model-ema`) names that run and its command with
`--init-run` / `--init-command`, so the card gives every command from nothing to the shipped weights. A run
fine-tuned from a shipped checkpoint (`--init-from drivesim/pretrained/image-ldm-cpu-small`, e.g. on the latents of
a new autoencoder) passes that checkpoint's card with `--init-card` instead: it goes into the new card, nested, with
its commands and steps. Read it BEFORE `--out` overwrites it (copy it elsewhere first when `--out` is its folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from drivesim.configs import Preset, load_yaml
from drivesim.pretrained import weights_sha256
from drivesim.training.checkpoint import load_model, save_model, trained_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--ae", type=Path, required=True,
                    help="the autoencoder it ships with: its encoder made the latents that trained the run")
    ap.add_argument("--measured", type=Path, required=True, help="benchmarks/box_fidelity.py result of the run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-command", required=True)
    ap.add_argument("--init-run", type=Path, default=None, help="the run this one was fine-tuned from (--init-from)")
    ap.add_argument("--init-command", default=None, help="the training command of --init-run")
    ap.add_argument("--init-card", type=Path, default=None,
                    help="the model card of the shipped checkpoint the run was fine-tuned from (instead of --init-run)")
    ap.add_argument("--notes", default=None, help="how it was trained, in words (machine, threads, anything unusual)")
    ap.add_argument("--encode-command", default="drivesim encode --ae drivesim/pretrained/autoencoder-cpu-small "
                                                "--data data/sample --out runs/latents_ship.h5")
    args = ap.parse_args()
    init = None
    if args.init_run is not None and args.init_card is not None:
        sys.exit("--init-run and --init-card: give one (a run, or the card of a shipped checkpoint)")
    if args.init_card is not None:
        base = json.loads(args.init_card.read_text())
        if base.get("model_class") != "image_ldm":
            sys.exit(f"--init-card: {args.init_card} is not an image LDM's model card (model_class "
                     f"{base.get('model_class')!r})")
        init = {"card": base, "steps": base["steps"]}
    torch.set_grad_enabled(False)
    src = args.run / "model-ema"
    model = load_model(src, "image_ldm")
    from drivesim.autoencoder.model import encoder_id

    if model.config.encoder_id != encoder_id(*load_model(args.ae, "autoencoder_kl").encoder_fingerprint()):
        sys.exit(f"{args.ae}: its encoder did not make the latents {src} was trained on (encoder_id differs)")
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_model(model, args.out, state_dict=state)
    steps = trained_steps(args.run)
    tc = load_yaml(Preset, args.run / "config-image_ldm.yaml").train["image_ldm"]
    measured = json.loads(args.measured.read_text())
    if args.init_run is not None:
        init = {"run": str(args.init_run), "command": args.init_command, "steps": trained_steps(args.init_run)}
    rows = measured["rows"]
    keys = ("all", "lt8", "8to16", "ge12", "ge16")
    card = {
        "name": args.out.name, "model_class": "image_ldm",
        "command": args.train_command, "encode_command": args.encode_command,
        "ship_command": shlex.join(["python", *sys.argv]),
        "data": "data/sample (train split latents)", "autoencoder": str(args.ae),
        "autoencoder_sha256": weights_sha256(args.ae),
        "steps": steps + (init["steps"] if init else 0),
        **({"init_from": init, "fine_tune_steps": steps} if init else {}),
        "batch_size": tc.batch_size, "lr": tc.lr, "lr_schedule": tc.lr_schedule,
        "ema_decay": tc.ema_decay, "seed": tc.seed, "weights": "model-ema of the run, cast to float16",
        "measured_with": measured["command"],
        "ap50": {name: {k: row[k]["AP50"] for k in keys} for name, row in rows.items()},
        "fid": measured.get("fid"), "day_night": measured.get("day_night"),
    }
    generated = {k.removeprefix("generated_guidance_"): v["ge16"] for k, v in card["ap50"].items()
                 if k.startswith("generated_guidance_")}
    shuffled = max(v["ge16"] for k, v in card["ap50"].items() if k.startswith("shuffled_guidance_"))
    card["summary"] = ("box AP50 (>= 16 px) of its samples " + ", ".join(
        f"{v:.3f} at guidance {g}" for g, v in generated.items()) + f" vs {card['ap50']['real']['ge16']:.3f} on real "
        f"frames (shuffled boxes <= {shuffled:.3f})")
    if args.notes:
        card["notes"] = args.notes
    (args.out / "model_card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
