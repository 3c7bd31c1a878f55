"""`drivesim encode`: fill the HDF5 latent cache with a trained autoencoder's latents."""

from __future__ import annotations

from pathlib import Path

import typer


def encode_cmd(
    ae: Path = typer.Option(..., "--ae", help="Autoencoder checkpoint: exported model folder or a training run."),
    data: Path = typer.Option(..., "--data", help="Clip-format dataset folder (with manifest.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .h5 latent cache to write (atomically; an "
                                                      "existing file only with --overwrite)."),
    size: str = typer.Option(None, "--size", help="Resize frames to HEIGHTxWIDTH before encoding (default: "
                             "the video size)."),
    sample: bool = typer.Option(False, "--sample/--mean", help="Store one posterior sample instead of the "
                                "posterior mean (default: mean)."),
    scale: str = typer.Option("auto", "--scale-factor", help="auto: compute 1/std of latents from the train "
                              "split when the checkpoint has none yet (scale_factor = 1.0) and write it into the "
                              "checkpoint's config.json; keep: use the checkpoint's; or a number."),
    scale_frames: int = typer.Option(512, "--scale-frames", help="Train frames used to compute the scale factor."),
    batch_frames: int = typer.Option(16, "--batch-frames", help="Frames encoded per forward pass (a 3D "
                                     "autoencoder encodes each clip whole)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored latent dtype: float16 or float32."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    box_reduction: str = typer.Option("union", "--box-reduction", help="3D autoencoder only (one latent frame per "
                                      "4 video frames): union (per track, the box holding its boxes in the 4 "
                                      "frames) or middle (the boxes of the group's third frame)."),
) -> None:
    """Encode every train/val clip of DATA with the autoencoder AE into the latent cache OUT.

    The cache records the encoder's identity (sha256 of its config and encoder weights), so a cache written by
    another autoencoder is refused by readers, and the autoencoder's scale factor. With a 3D autoencoder
    (drivesim train autoencoder_3d) a latent frame stands for 4 video frames; the cache records that and keeps the
    boxes per latent frame (--box-reduction) and per video frame.
    """
    from drivesim.pipeline.data import parse_size
    from drivesim.pipeline.encode import encode_dataset

    r = encode_dataset(ae, data, out, size=parse_size(size), sample=sample, scale=scale, scale_frames=scale_frames,
                       batch_frames=batch_frames, dtype=dtype, device=device, overwrite=overwrite,
                       box_reduction=box_reduction, log=typer.echo)
    per = f", {r['frames_per_latent']} video frames per latent frame" if r["frames_per_latent"] > 1 else ""
    typer.echo(f"wrote {r['path']} (scale_factor {r['scale_factor']:.5f}, {r['latents']} latents, {r['dtype']}{per})")
