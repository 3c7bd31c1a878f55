"""`drivesim sample-image`: box- and day/night-conditioned frames from a trained image LDM, written as PNGs.

The boxes.json format is documented in `drivesim.pipeline.sample`.
"""

from __future__ import annotations

from pathlib import Path

import typer


def sample_image(
    ckpt: Path = typer.Option(..., "--ckpt", help="Image LDM checkpoint folder (or a training run's out dir)."),
    boxes: Path = typer.Option(..., "--boxes", help="boxes.json (see `drivesim sample-image --help` docs)."),
    out: Path = typer.Option(..., "--out", help="Output folder for the PNGs."),
    night: int | None = typer.Option(None, "--night", help="1 = night, 0 = day (default: from boxes.json, else 0)."),
    crowdedness: int | None = typer.Option(None, "--crowdedness", help="Vehicle count (default: from the file)."),
    ae: Path | None = typer.Option(None, "--ae", help="Autoencoder checkpoint to decode latents to pixels."),
    num_samples: int = typer.Option(4, "--num-samples", "-n", min=1, help="Samples to draw."),
    steps: int | None = typer.Option(None, "--steps", help="Sampler steps (default: the model config's)."),
    sampler: str | None = typer.Option(None, "--sampler", help="ddim | dpmpp (default: the model config's)."),
    guidance_scale: float | None = typer.Option(None, "--guidance-scale", help="CFG scale s (1 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    ema: bool | None = typer.Option(None, "--ema/--no-ema", help="Use EMA weights (default: when present)."),
    device: str = typer.Option("cpu", "--device", help="torch device."),
) -> None:
    """Sample frames from a box- and day/night-conditioned image LDM and write PNGs (with and without boxes).

    boxes.json holds `width`, `height` (pixels, multiples of 8) and `boxes`: a list of
    {"class", "x1", "y1", "x2", "y2"} in pixels (image frame, xyxy); optional `night` and `crowdedness`.
    """
    from drivesim.pipeline.sample import sample_images

    r = sample_images(ckpt, boxes, out, night=night, crowdedness=crowdedness, ae=ae, num_samples=num_samples,
                      steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed, ema=ema, device=device)
    typer.echo(f"wrote {r['num_png']} PNGs to {out} ({'decoded' if r['decoded'] else 'latent channels 0-2'}, "
               f"night={r['night']}, crowdedness={r['crowdedness']})")
