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
    batch_frames: int = typer.Option(16, "--batch-frames", help="Frames encoded per forward pass."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored latent dtype: float16 or float32."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Encode every train/val clip of DATA with the autoencoder AE into the latent cache OUT.

    The cache records the encoder's identity (sha256 of its config and encoder weights), so a cache written by
    another autoencoder is refused by readers, and the autoencoder's scale factor.
    """
    from drivesim.pipeline.data import parse_size
    from drivesim.pipeline.encode import encode_dataset

    r = encode_dataset(ae, data, out, size=parse_size(size), sample=sample, scale=scale, scale_frames=scale_frames,
                       batch_frames=batch_frames, dtype=dtype, device=device, overwrite=overwrite, log=typer.echo)
    typer.echo(f"wrote {r['path']} (scale_factor {r['scale_factor']:.5f}, {r['latents']} latents, {r['dtype']})")
