"""Encoding a clip-format dataset into the HDF5 latent cache with a trained autoencoder (`drivesim encode`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def encode_dataset(ae: Path, data: Path, out: Path, *, size: tuple[int, int] | None = None, sample: bool = False,
                   scale: str | float = "auto", scale_frames: int = 512, batch_frames: int = 16,
                   dtype: str = "float16", device: str = "cpu", overwrite: bool = False, box_reduction: str = "union",
                   log: Callable[[str], None] = print) -> dict:
    """Encode every train/val clip of the dataset `data` with the autoencoder `ae` into the latent cache `out`.

    The cache records the encoder's identity (sha256 of its config and encoder weights), so a cache written by
    another autoencoder is refused by readers, and the autoencoder's scale factor.

    With LVDM's 3D autoencoder (`video_autoencoder_3d`) each latent frame stands for `frames_per_latent` (4) video
    frames: every clip is encoded whole (its first floor(T / 4) * 4 frames), the cache records frames_per_latent and
    `box_reduction` (how each group's boxes became one latent frame's, see
    `drivesim.bbox_conditioning.latent_frames`; the per-frame boxes are kept beside them), and the scale factor is
    computed from consecutive clips of `decode_chunk_frames * frames_per_latent` frames.

    Args:
        ae: exported autoencoder folder (or a training run).
        data: clip-format dataset folder; out: the .h5 to write (atomically).
        size: (h, w) pixels to resize frames to before encoding (multiples of 8); None keeps the video size.
        sample: store one posterior sample instead of the posterior mean.
        scale: "auto" computes 1/std of the train latents when the checkpoint has none yet (scale_factor 1.0) and
            writes it into the checkpoint's config.json; "keep" uses the checkpoint's; a number sets it.
        scale_frames: train frames used for "auto"; batch_frames: frames per forward pass.
        dtype: stored latent dtype, "float16" or "float32"; device: torch device.
        overwrite: replace an existing `out` (never an input).
        box_reduction: "union" or "middle" (3D autoencoder only; ignored for per-frame latents).
        log: where progress lines go.

    Returns:
        {"path", "scale_factor", "latents": "sample" | "mean", "dtype", "frames_per_latent"}.

    Raises:
        ConfigError: bad arguments, an output over an input or an existing one without `overwrite`, `ae` not an
            autoencoder; DataError / CheckpointError from the dataset and checkpoint readers.
    """
    import torch

    from drivesim.autoencoder import AutoencoderKL, compute_scale_factor
    from drivesim.bbox_conditioning.latent_frames import BOX_REDUCTIONS
    from drivesim.datasets.latent_cache import encoder_id, write_cache
    from drivesim.errors import ConfigError
    from drivesim.pipeline.outputs import check_output
    from drivesim.training.checkpoint import CONFIG_NAME, load_model, save_model

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype: expected float16 or float32, got {dtype!r}")
    if batch_frames < 1:
        raise ConfigError(f"--batch-frames: must be >= 1, got {batch_frames}")
    if box_reduction not in BOX_REDUCTIONS:
        raise ConfigError(f"--box-reduction: expected one of {', '.join(BOX_REDUCTIONS)}, got {box_reduction!r}")
    hw = size
    ae, data, out = Path(ae), Path(data), Path(out)
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
        if model.frames_per_latent == 1:
            batches = train_frames(data, hw, scale_frames, batch_frames, device)
        else:
            batches = train_clips(data, hw, scale_frames, model.config.decode_chunk_frames * model.frames_per_latent,
                                  device)
        value = compute_scale_factor(model, batches, sample=sample)
        model.set_scale_factor(value)
        if (ae / CONFIG_NAME).is_file():
            save_model(model, ae)
            log(f"scale_factor {value:.5f} (1/std of latents, {scale_frames} train frames at most) "
                f"written to {ae / CONFIG_NAME}")
        else:
            log(f"scale_factor {value:.5f} computed (recorded in the cache; {ae} is a training run, "
                "not an exported model folder, so it was not updated)")

    def encode_fn(frames: torch.Tensor) -> torch.Tensor:
        return model.encode(frames.to(device)[None]).latents(sample)[0]

    fields, digest = model.encoder_fingerprint()
    path = write_cache(data, encode_fn, out, encoder_id(fields, digest), batch_frames=batch_frames,
                       scale_factor=model.config.scale_factor, size=hw, dtype=dtype,
                       created_by=f"drivesim encode --ae {ae}", frames_per_latent=model.frames_per_latent,
                       box_reduction=box_reduction)
    return {"path": str(path), "scale_factor": model.config.scale_factor, "latents": "sample" if sample else "mean",
            "dtype": dtype, "frames_per_latent": model.frames_per_latent}


def train_frames(data: Path, size, max_frames: int, batch_frames: int, device: str):
    """Yield (1, t, 3, h, w) float32 batches in [-1, 1] of train-split frames (every clip's when the dataset has no
    train split), at most `max_frames` in all, spread evenly over the clips; `size` (h, w) resizes them."""
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


def train_clips(data: Path, size, max_frames: int, clip_frames: int, device: str):
    """Yield (1, clip_frames, 3, h, w) float32 batches in [-1, 1] of CONSECUTIVE train-split frames (every clip's when
    the dataset has no train split), for a 3D encoder: non-overlapping windows spread evenly over each clip, about
    `max_frames` frames in all (at least one window per clip that is long enough); `size` (h, w) resizes them."""
    from drivesim.datasets.clips import load_clip, read_manifest
    from drivesim.datasets.transforms import frames_to_tensor, resize_frames

    entries = [e for e in read_manifest(data).clips if e.split == "train"] or list(read_manifest(data).clips)
    per_clip = max(1, max_frames // max(len(entries), 1) // clip_frames)  # windows per clip
    left = max(max_frames, clip_frames)
    for entry in entries:
        if left < clip_frames:
            return
        frames, _ = load_clip(entry)
        fit = len(frames) // clip_frames
        if fit == 0:
            continue
        if size is not None:
            frames = resize_frames(frames, size)
        for k in range(min(per_clip, fit, left // clip_frames)):
            start = k * fit // min(per_clip, fit) * clip_frames
            left -= clip_frames
            yield frames_to_tensor(frames[start:start + clip_frames])[None].to(device)
