"""Turn a trained autoencoder run into the checkpoint drivesim ships (fp16 safetensors + config + model card).

    python scripts/ship_autoencoder.py --run runs/ae_ship --data data/sample --detector runs/det \
        --out drivesim/pretrained/autoencoder-cpu-small --train-command "drivesim train autoencoder ..."

Steps: load the run's EMA export (model-ema/, else model/); compute the latent scale factor from posterior MEANS of
train frames (what `drivesim encode` caches); write the weights in float16 with the config; measure the shipped
file with `benchmarks/box_fidelity.py` (PSNR over frames and inside boxes, the reference detector's AP on
reconstructions vs real val frames) and write `model_card.json` with the commands, data, steps and those numbers.

A decoder-only fine-tune (`autoencoder.decoder_only`, started `--init-from` a shipped autoencoder) keeps that
checkpoint's encoder and scale factor, so its encoder fingerprint, and the latent caches and latent models made
with it, stay valid: the script checks the encoder is bit for bit the base's, copies the base's scale factor and
puts the base's card (its commands and steps) into the new card. A full fine-tune from a shipped checkpoint gets a
new scale factor (new encoder, new latents) and likewise carries the base's card, nested, so the card holds the
whole recipe. Read the base card BEFORE `--out` overwrites it: pass `--base-card` when `--out` is the base's own
folder.

The measurement goes to `--result` and `--strip`, by default the shipped autoencoder's results file and the picture
the docs show; a candidate staged elsewhere (`--out runs/ae_staged`) passes its own paths, e.g.
`--result runs/ae_staged/box_fidelity.json --strip runs/ae_staged/strip.png`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from drivesim.autoencoder import AutoencoderKL, compute_scale_factor
from drivesim.configs import Preset, load_yaml
from drivesim.training.checkpoint import load_model, save_model, trained_steps

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training run folder (model/, model-ema/, checkpoints/)")
    ap.add_argument("--data", type=Path, default=Path("data/sample"))
    ap.add_argument("--detector", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-command", required=True, help="the command that trained --run (goes into the card)")
    ap.add_argument("--detector-command", default="drivesim eval train-detector data/sample --out runs/det")
    ap.add_argument("--scale-frames", type=int, default=512)
    ap.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "box_fidelity_autoencoder.json",
                    help="where the box-fidelity measurement of the shipped file goes (default: the shipped "
                         "autoencoder's results file; give another path when staging a candidate)")
    ap.add_argument("--strip", type=Path, default=ROOT / "docs" / "measurements" / "autoencoder_reconstructions.png",
                    help="reconstruction strip of that measurement (default: the one the docs show)")
    ap.add_argument("--base-card", type=Path, default=None,
                    help="decoder-only runs: a copy of the base checkpoint's model_card.json (default: the one in "
                         "the run's init_from folder)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    src = args.run / "model-ema" if (args.run / "model-ema" / "config.json").is_file() else args.run / "model"
    model = load_model(src, AutoencoderKL)
    from drivesim.pipeline.encode import train_frames

    train_cfg = load_yaml(Preset, args.run / "config-autoencoder.yaml").train["autoencoder"]
    base_card = None
    if train_cfg.init_from:  # a fine-tune of a shipped checkpoint: its card's recipe goes into the new card
        card_path = args.base_card or Path(train_cfg.init_from) / "model_card.json"
        if not card_path.is_file():
            sys.exit(f"{card_path}: no model card of the run's train.init_from checkpoint (pass --base-card)")
        base_card = json.loads(card_path.read_text())
    if model.config.decoder_only:
        if not train_cfg.init_from:
            sys.exit(f"{args.run}: decoder_only run without train.init_from: no base encoder to keep")
        base = load_model(train_cfg.init_from, AutoencoderKL)
        if not all(torch.equal(a, b.to(a.dtype)) for a, b in zip(base.encoder.state_dict().values(),
                                                                  model.encoder.state_dict().values(), strict=True)):
            sys.exit(f"{args.run}: the encoder differs from {train_cfg.init_from}'s: not a decoder-only fine-tune")
        scale = base.config.scale_factor
        scale_from = "kept from the base checkpoint (decoder-only fine-tune: same encoder, same latents)"
    else:
        scale = compute_scale_factor(model, train_frames(args.data, (128, 256), args.scale_frames, 16, "cpu"),
                                     sample=False)
        scale_from = f"posterior means of {args.scale_frames} train frames"
    model.set_scale_factor(scale)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_model(model, args.out, state_dict=state)

    measured = args.result
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "box_fidelity.py"), "--data", str(args.data),
                    "--detector", str(args.detector), "--ae", str(args.out), "--every", "1", "--out", str(measured),
                    "--strip", str(args.strip)], check=True)
    result = json.loads(measured.read_text())
    steps = trained_steps(args.run)
    rows = result["rows"]
    card = {
        "name": args.out.name,
        "model_class": "autoencoder_kl",
        "command": args.train_command,
        "ship_command": shlex.join(["python", *sys.argv]),
        "detector_command": args.detector_command,
        "data": str(args.data), "data_split": "train (48 clips, 1536 frames)",
        "weights": f"{src.name} of the run, cast to float16",
        "steps": steps,
        "batch_size": train_cfg.batch_size,
        "lr": train_cfg.lr, "lr_schedule": train_cfg.lr_schedule, "ema_decay": train_cfg.ema_decay,
        "box_weight": model.config.box_weight,
        "seed": 0,
        "scale_factor": scale,
        "scale_factor_from": scale_from,
        "measured_on": f"{args.data} val split, {result['protocol']['frames']} frames (benchmarks/box_fidelity.py)",
        "psnr_db": result["autoencoder"]["psnr_db"],
        "detector_sha256": result["protocol"]["detector_sha256"],
        "ap50_reconstructions": {k: rows["autoencoder"][k]["AP50"] for k in ("all", "lt8", "8to16", "ge12", "ge16")},
        "ap50_real_frames": {k: rows["real"][k]["AP50"] for k in ("all", "lt8", "8to16", "ge12", "ge16")},
        "ceiling_ge12_AP50_ratio": result["autoencoder"]["ceiling_ge12_AP50_ratio"],
    }
    if base_card is not None:
        # the whole recipe, in order: the base's training and shipping (and its own base, nested), then this
        # fine-tune from it
        card["decoder_only"] = bool(model.config.decoder_only)
        card["base"] = {k: base_card[k] for k in ("command", "ship_command", "steps", "lr", "lr_schedule",
                                                  "box_weight", "decoder_only", "summary", "base", "total_steps")
                        if k in base_card}
        card["base"]["init_from_of_this_run"] = str(train_cfg.init_from)
        card["total_steps"] = (base_card.get("total_steps") or base_card.get("steps") or 0) + (card["steps"] or 0)
    psnr, rec50, real50 = card["psnr_db"], card["ap50_reconstructions"], card["ap50_real_frames"]
    card["summary"] = (f"PSNR {psnr['frame']:.1f} dB, {psnr['boxes_ge12']:.1f} dB inside boxes >= 12 px; box AP50 "
                       f"(>= 12 px) {rec50['ge12']:.3f} on reconstructions vs {real50['ge12']:.3f} on real frames")
    (args.out / "model_card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
