"""`drivesim generate`: a labelled synthetic dataset (clip format) from real box tracks or scenario files.

The work is `drivesim.pipeline.generate`; this module parses options and prints.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

EPILOG = """\
Examples:

  drivesim generate data/sample --stack runs/demo/stack --out runs/gen \\
      --split train --clips 20 --seed 1 --flip-daynight

  drivesim generate scen/ --stack runs/demo/stack --out runs/gen --hflip \\
      --drop-boxes 0.2 --jitter-boxes 4 --time-shift 5 --steps 20

Rerun the same command to continue a killed run (finished clips are kept; the
result equals an uninterrupted run). Then:

  drivesim data validate runs/gen
  drivesim export runs/gen --format coco --out runs/gen_coco

Over processes (process r makes clips r, r + W, ...; the main process writes
the manifest when every clip is done):

  accelerate launch --num_processes 2 -m drivesim.cli.main generate \\
      data/sample --stack runs/demo/stack --out runs/gen --device cuda
"""


def generate_cmd(
    source: list[Path] = typer.Argument(..., help="A clip-format dataset folder (its clips' box tracks, day/night, "
                                                  "crowdedness), or scenario JSON files / folders of them."),
    stack: Path = typer.Option(..., "--stack", help="Trained stack D/{autoencoder,image_ldm,prediction,"
                                                    "interpolation[,upsampler]} (e.g. runs/demo/stack)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset folder (clip format)."),
    split: str = typer.Option("all", "--split", help="Source clips of this split: train, val or all (datasets "
                                                     "only); each generated clip keeps its source's split."),
    clips: int = typer.Option(None, "--clips", help="Clips to generate, cycling over the source clips "
                                                    "(default: one per source clip)."),
    frames: int = typer.Option(None, "--frames", help="Frames per clip (default: the source clip's length at "
                                                      "the stack's frame rate)."),
    seed: int = typer.Option(0, "--seed", help="Run seed; each clip gets its own seed from it (in the manifest)."),
    steps: int = typer.Option(None, "--steps", help="Sampler steps per model call (default: each model's)."),
    flip_daynight: bool = typer.Option(False, "--flip-daynight", help="Day <-> night (written into the labels)."),
    hflip: bool = typer.Option(False, "--hflip", help="Mirror the boxes horizontally: x -> W - x."),
    drop_boxes: float = typer.Option(0.0, "--drop-boxes", help="Drop each track with probability P (seeded per "
                                                               "clip)."),
    jitter_boxes: int = typer.Option(0, "--jitter-boxes", help="Shift each track by a random offset of up to PX "
                                                               "pixels in x and y (seeded per clip)."),
    time_shift: int = typer.Option(0, "--time-shift", help="Start the source tracks K frames (of the source) later."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda (cuda:LOCAL_RANK under a "
                                                       "launcher)."),
    config: Path = typer.Option(None, "--config", help="RolloutConfig YAML."),
    sets: list[str] = typer.Option([], "--set", help="RolloutConfig override key=value, repeatable."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate labelled synthetic clips with a trained stack: the source's box tracks, augmented, become each
    clip's conditioning and its labels; written as a clip-format dataset (data validate, export)."""
    from drivesim.pipeline.generate import Augmentations, generate_dataset
    from drivesim.pipeline.rollout import resolve_config

    cfg = resolve_config(config, sets, False)
    argv = ["drivesim", "generate", *map(str, source), "--stack", str(stack), "--out", str(out), "--split", split,
            "--seed", str(seed)]
    for flag, value in (("--clips", clips), ("--frames", frames), ("--steps", steps), ("--config", config)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [f"--set={s}" for s in sets]
    if flip_daynight:
        argv.append("--flip-daynight")
    if hflip:
        argv.append("--hflip")
    for flag, value in (("--drop-boxes", drop_boxes), ("--jitter-boxes", jitter_boxes), ("--time-shift", time_shift)):
        if value:
            argv += [flag, str(value)]
    aug = Augmentations(time_shift=time_shift, hflip=hflip, drop_boxes=drop_boxes, jitter_boxes=jitter_boxes,
                        flip_daynight=flip_daynight)
    summary = generate_dataset(source, stack, out, clips=clips, frames=frames, seed=seed, steps=steps,
                               augmentations=aug, split=split, cfg=cfg, device=device, command=shlex.join(argv),
                               progress=not quiet, log=lambda m: typer.echo(m, err=True))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    if summary["complete"]:
        typer.echo(f"wrote {out}: {summary['clips']} clip(s) ({summary['made']} made now, "
                   f"{summary['clips'] - summary['made']} already done); check it with drivesim data validate {out}")
    else:
        typer.echo(f"{out}: {summary['done']} of {summary['clips']} clip(s) done ({summary['made']} made now by "
                   f"process {summary['rank']} of {summary['world_size']}); the main process writes the manifest "
                   "when all are done")
