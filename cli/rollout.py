"""`drivesim rollout`: a multi-minute video for a scenario (or a folder of them), streamed to disk, resumable.

The work is `drivesim.pipeline.rollout`; this module parses options and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from drivesim.errors import ConfigError, DataError

EPILOG = """\
Examples:

  drivesim rollout --scenario s.json --ckpt-dir runs/stack --minutes 2 \\
      --out runs/rollout --seed 0

  drivesim rollout ... --resume            continue a killed rollout (same frames)
  drivesim rollout ... --set context_guidance=1.0 --set context_noise_level=0
  drivesim rollout ... --upsample          x4 pixel upsampler (needs D/upsampler)

Checkpoint dir D: D/autoencoder D/image_ldm D/prediction D/interpolation
[D/upsampler], each an exported model folder (drivesim.load). On LVDM's 3D
latents (D/autoencoder a video_autoencoder_3d): D/autoencoder D/prediction
[D/upsampler] only (one latent frame = 4 frames, no interpolation).

Many scenarios over processes (each scenario done exactly once, rank r takes
scenarios r, r + W, ... of the sorted *.json; seeds are seed + index):

  accelerate launch --num_processes 2 -m drivesim.cli.main rollout \\
      --scenarios scen/ --ckpt-dir runs/stack --minutes 1 --out runs/rollouts
"""


def rollout_cmd(
    scenario: Path = typer.Option(None, "--scenario", "-s", help="Scenario JSON (drivesim scenario from-clip)."),
    scenarios: Path = typer.Option(None, "--scenarios", help="Folder of scenario JSONs: one rollout each, "
                                                             "sharded over processes (accelerate launch)."),
    ckpt_dir: Path = typer.Option(..., "--ckpt-dir", help="D/{autoencoder,image_ldm,prediction,interpolation"
                                                          "[,upsampler]} exported model folders (3D autoencoder: "
                                                          "D/{autoencoder,prediction[,upsampler]})."),
    minutes: float = typer.Option(None, "--minutes", help="Length of the video in minutes."),
    frames: int = typer.Option(None, "--frames", help="Length in output frames (instead of --minutes)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (with --scenarios: one sub-folder each)."),
    seed: int = typer.Option(0, "--seed", help="Rollout seed (--scenarios: seed + index in sorted order)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed rollout in OUT (identical frames)."),
    upsample: bool = typer.Option(False, "--upsample", help="Run the x4 video upsampler (D/upsampler)."),
    config: Path = typer.Option(None, "--config", help="RolloutConfig YAML."),
    sets: list[str] = typer.Option([], "--set", help="RolloutConfig override key=value, repeatable."),
    device: str = typer.Option("cpu", "--device", help="torch device of the models, e.g. cuda (noise is drawn on "
                                                       "the CPU; resume on the same device for identical frames); "
                                                       "under accelerate/torchrun, cuda means cuda:LOCAL_RANK."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate a multi-minute driving video that follows a scenario's boxes (key frames -> x4 -> x4, video
    decoder, optional upsampler), streamed to disk and resumable."""
    from drivesim.pipeline.rollout import resolve_config, rollout_scenarios

    if (scenario is None) == (scenarios is None):
        raise ConfigError("rollout: give exactly one of --scenario FILE or --scenarios DIR")
    if scenarios is not None and not scenarios.is_dir():
        raise DataError(f"{scenarios}: --scenarios: folder not found")
    cfg = resolve_config(config, sets, upsample)

    def say(r: dict) -> None:
        extra = r.get("unconditioned_boxes") or {}
        if extra.get("boxes"):
            typer.echo(f"note: {r['out']}: {extra['boxes']} labelled box(es) in {extra['frames']} frame(s) did not "
                       f"condition the video (more than max_boxes={extra['max_boxes']} boxes in a frame: the "
                       "largest are kept); rollout.json marks them \"conditioned\": false", err=True)
        if not as_json:
            typer.echo(f"{r['out']}: {r['frames_written']} frames ({r['num_frames'] / r['fps']:.1f} s at "
                       f"{r['fps']:g} fps) in {r['seconds']:.1f} s"
                       + (f" (resumed at unit {r['resumed_from']})" if r["resumed_from"] else ""))

    results = rollout_scenarios(scenario if scenario is not None else scenarios, ckpt_dir, out, cfg, minutes=minutes,
                                frames=frames, seed=seed, resume=resume, device=device, progress=not quiet,
                                on_done=say, config_source=str(config) if config else "--set fps")
    if as_json:
        typer.echo(json.dumps(results if scenarios is not None else results[0]))
