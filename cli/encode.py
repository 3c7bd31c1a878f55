"""`drivesim encode`: fill the HDF5 latent cache (issue 2's store) with a trained autoencoder's latents."""

from __future__ import annotations

from pathlib import Path

import typer


def _parse_size(text: str | None) -> tuple[int, int] | None:
    from drivesim.errors import ConfigError

    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected HEIGHTxWIDTH such as 128x256, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ConfigError(f"--size: height and width must be positive multiples of 8, got {text!r}")
    return h, w


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
    import torch
    from drivesim.cli.outputs import check_output
    from drivesim.datasets.latent_cache import encoder_id, write_cache

    from drivesim.autoencoder import AutoencoderKL, compute_scale_factor
    from drivesim.errors import ConfigError
    from drivesim.training.checkpoint import CONFIG_NAME, load_model, save_model

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype: expected float16 or float32, got {dtype!r}")
    if batch_frames < 1:
        raise ConfigError(f"--batch-frames: must be >= 1, got {batch_frames}")
    hw = _parse_size(size)
    check_output(out, {"--data": data, "--ae": ae}, overwrite)
    model = load_model(ae, device=device)
    if not isinstance(model, AutoencoderKL):
        raise ConfigError(f"{ae}: --ae: holds a {type(model).__name__}, not an autoencoder")
    model.eval()

    if scale not in ("auto", "keep"):
        try:
            value = float(scale)
        except ValueError:
            raise ConfigError(f"--scale-factor: expected auto, keep or a number, got {scale!r}") from None
        model.set_scale_factor(value)
    elif scale == "auto" and model.config.scale_factor == 1.0:
        # from the latents the cache will hold (means by default), so cached latents x scale have unit std
        value = compute_scale_factor(model, _train_frames(data, hw, scale_frames, batch_frames, device),
                                     sample=sample)
        model.set_scale_factor(value)
        if (ae / CONFIG_NAME).is_file():
            save_model(model, ae)
            typer.echo(f"scale_factor {value:.5f} (1/std of latents, {scale_frames} train frames at most) "
                       f"written to {ae / CONFIG_NAME}")
        else:
            typer.echo(f"scale_factor {value:.5f} computed (recorded in the cache; {ae} is a training run, "
                       "not an exported model folder, so it was not updated)")

    def encode_fn(frames: torch.Tensor) -> torch.Tensor:
        return model.encode(frames.to(device)[None]).latents(sample)[0]

    fields, digest = model.encoder_fingerprint()
    path = write_cache(data, encode_fn, out, encoder_id(fields, digest), batch_frames=batch_frames,
                       scale_factor=model.config.scale_factor, size=hw, dtype=dtype,
                       created_by=f"drivesim encode --ae {ae}")
    typer.echo(f"wrote {path} (scale_factor {model.config.scale_factor:.5f}, {'sample' if sample else 'mean'} "
               f"latents, {dtype})")


def _train_frames(data: Path, size, max_frames: int, batch_frames: int, device: str):
    """Yield (1, t, 3, h, w) batches of train-split frames, at most `max_frames` in all, evenly over clips."""
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.datasets.transforms import frames_to_tensor, resize_frames

    entries = [e for e in read_manifest(data).clips if e.split == "train"] or list(read_manifest(data).clips)
    per_clip = max(1, max_frames // max(len(entries), 1))
    left = max_frames
    for entry in entries:
        if left <= 0:
            return
        frames, _ = load_clip(entry)
        if size is not None:
            frames = resize_frames(frames, size)
        step = max(1, len(frames) // per_clip)
        x = frames_to_tensor(frames[::step][: min(per_clip, left)])
        left -= len(x)
        for i in range(0, len(x), batch_frames):
            yield x[i:i + batch_frames][None].to(device)
