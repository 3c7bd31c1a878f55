"""Sampling single frames (`drivesim sample-image`): box- and day/night-conditioned frames from a trained image
LDM, written as PNGs.

boxes.json (pixel coordinates of a `width` x `height` image, image frame: x right, y down, xyxy)::

    {
      "width": 256, "height": 128,
      "night": 0,                # optional (0 day, 1 night); --night overrides it; default 0
      "crowdedness": 3,          # optional vehicle count; default: number of vehicle-class boxes
      "boxes": [
        {"class": "car", "x1": 20, "y1": 60, "x2": 90, "y2": 110},
        {"class": "pedestrian", "x1": 200, "y1": 50, "x2": 212, "y2": 90}
      ]
    }

Boxes follow the clip format's rules (`drivesim.datasets.clips.parse_box`): `class` is a name from
`drivesim.bbox_conditioning.classes.CLASS_NAMES`, coordinates are finite with positive area, and a box that sticks
out of the image is clipped to it. The latent size is
(height / 8, width / 8). Output: `sample_000.png`, ... and `sample_000_boxes.png` with the boxes drawn. Without
`--ae` the PNGs show the first three latent channels (min-max normalised, upsampled x8) instead of decoded
pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# samples per call: they are drawn as one batch (more: call again with another seed); 1e15 failed deep in torch
MAX_SAMPLES = 256

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def read_boxes_json(path: Path, max_boxes: int) -> dict:
    """Parse and validate a boxes.json file (format in the module docstring).

    Returns:
        {"width", "height", "night" (int or None), "crowdedness" (int), "boxes" (1, 1, n, 4) float32 normalised
        xyxy tensor, "classes" (1, 1, n) int64, "box_mask" (1, 1, n) bool, "track_ids" (1, 1, n) int64 (the
        box's index in the file)} with n = max_boxes.
    Raises:
        DataError: unreadable JSON or an invalid field (message names the file and the field).
    """

    from drivesim.bbox_conditioning.boxes import pack_boxes
    from drivesim.bbox_conditioning.classes import CLASS_TO_ID, VEHICLE_CLASSES
    from drivesim.datasets.clips import parse_frame_boxes
    from drivesim.errors import DataError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: <root>: expected an object with width, height and boxes")
    size = {}
    for key in ("width", "height"):
        v = data.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8:
            raise DataError(f"{path}: {key}: expected a positive multiple of 8, got {v!r}")
        size[key] = v
    night = data.get("night")
    if night is not None and night not in (0, 1):
        raise DataError(f"{path}: night: expected 0 or 1, got {night!r}")
    boxes = data.get("boxes")
    if not isinstance(boxes, list):
        raise DataError(f"{path}: boxes: expected a list")
    if len(boxes) > max_boxes:  # a request the model cannot honour: refused, never silently cut
        raise DataError(f"{path}: boxes: {len(boxes)} boxes, the model takes at most {max_boxes}")
    # the clip format's box rules (class names, finite coordinates, positive area, clipped to the image); the
    # file has no track ids: a box's index stands for it
    raw = [{"track_id": j, **box} if isinstance(box, dict) else box for j, box in enumerate(boxes)]
    parsed, _ = parse_frame_boxes(raw, size["width"], size["height"], Path(path), 0, where="boxes")
    tuples = [(j, CLASS_TO_ID[box.cls], box.x1, box.y1, box.x2, box.y2) for j, box in enumerate(parsed)]
    vehicles = sum(box.cls in VEHICLE_CLASSES for box in parsed)
    crowd = data.get("crowdedness", vehicles)
    if isinstance(crowd, bool) or not isinstance(crowd, int) or crowd < 0:
        raise DataError(f"{path}: crowdedness: expected a non-negative integer, got {crowd!r}")
    packed = pack_boxes([tuples], size["width"], size["height"], max_boxes)
    return {**size, "night": night, "crowdedness": crowd, **packed.as_batch()}


def draw_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Draw boxes on a copy of `image`.

    Args:
        image: (h, w, 3) uint8 RGB.
        boxes: (n, 4) normalised xyxy, image frame; classes: (n,) int; mask: (n,) bool (False slots skipped).
    Returns:
        (h, w, 3) uint8 with one coloured rectangle per valid box (colour by class).
    """
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for (x1, y1, x2, y2), c, m in zip(boxes, classes, mask, strict=True):
        if m:
            draw.rectangle([x1 * w, y1 * h, x2 * w - 1, y2 * h - 1], outline=_PALETTE[int(c) % len(_PALETTE)])
    return np.asarray(pil)


def frames_to_uint8(frames) -> np.ndarray:
    """(..., 3, h, w) float in [-1, 1] -> (..., h, w, 3) uint8 (values outside [-1, 1] are clipped for display)."""
    import torch
    from einops import rearrange

    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "... c h w -> ... h w c").cpu().numpy()


def latents_to_uint8(latents) -> np.ndarray:
    """(..., c, h, w) latents -> (..., 8h, 8w, 3) uint8 of channels 0-2, each min-max normalised per image."""
    import torch
    from einops import rearrange, repeat

    x = latents[..., :3, :, :].float()
    lo = x.amin(dim=(-1, -2), keepdim=True)
    hi = x.amax(dim=(-1, -2), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    x = repeat(x, "... c h w -> ... c (h h8) (w w8)", h8=8, w8=8)
    return rearrange((x * 255).round().to(torch.uint8), "... c h w -> ... h w c").cpu().numpy()


def write_png(image: np.ndarray, path: Path) -> None:
    """Write (h, w, 3) uint8 RGB to `path` atomically (temp file + rename)."""
    from PIL import Image

    from drivesim.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _resolve_weights(ckpt: Path, ema: bool | None) -> bool:
    """Whether to load EMA weights: asked explicitly, or by default when the checkpoint holds them."""
    from drivesim.training.checkpoint import CHECKPOINTS_DIR, CONFIG_NAME, EMA_NAME, latest_checkpoint

    folder = ckpt
    if not (folder / CONFIG_NAME).exists() and (folder / CHECKPOINTS_DIR).is_dir():
        folder = latest_checkpoint(folder / CHECKPOINTS_DIR) or folder
    has_ema = (folder / EMA_NAME).exists()
    if ema is None:
        return has_ema
    if ema and not has_ema:
        from drivesim.errors import CheckpointError

        raise CheckpointError(f"{folder / EMA_NAME}: --ema: the checkpoint holds no EMA weights")
    return ema


def sample_images(ckpt: Path, boxes: Path, out: Path, *, night: int | None = None, crowdedness: int | None = None,
                  ae: Path | None = None, num_samples: int = 4, steps: int | None = None, sampler: str | None = None,
                  guidance_scale: float | None = None, seed: int = 0, ema: bool | None = None,
                  device: str = "cpu") -> dict:
    """Sample `num_samples` frames from the image LDM at `ckpt` for the boxes in `boxes` (boxes.json, module
    docstring) and write `out/sample_NNN.png` and `out/sample_NNN_boxes.png`.

    Args:
        night / crowdedness: labels (default: from boxes.json; night 0 when absent there).
        ae: autoencoder to decode with; None writes latent channels 0-2 instead of pixels.
        steps / sampler / guidance_scale: sampler settings (default: the model config's); seed: initial noise.
        ema: EMA weights (default: when the checkpoint holds them).

    Returns:
        {"out", "num_png", "decoded", "night", "crowdedness"}.

    Raises:
        ConfigError: a bad label, more than MAX_SAMPLES samples (before the model loads) or a size the U-Net
        cannot take; DataError: a bad boxes.json;
        CheckpointError: unreadable checkpoints.
    """
    import torch
    from einops import repeat

    from drivesim.errors import ConfigError
    from drivesim.training.checkpoint import load_model
    from drivesim.types import Conditioning

    if night is not None and night not in (0, 1):
        raise ConfigError(f"--night: expected 0 or 1, got {night}")
    if num_samples < 1 or num_samples > MAX_SAMPLES:  # before the model loads
        raise ConfigError(f"--num-samples: {num_samples} is outside 1..{MAX_SAMPLES} (the limit of samples per call: "
                          "they are drawn as one batch; run again with another --seed for more)")
    model = load_model(ckpt, "image_ldm", ema=_resolve_weights(ckpt, ema), device=device)
    spec = read_boxes_json(boxes, model.config.unet.boxes.max_boxes)
    night_label = night if night is not None else (spec["night"] or 0)
    crowd = crowdedness if crowdedness is not None else spec["crowdedness"]
    n = num_samples
    frames = {k: repeat(spec[k], "1 ... -> b ...", b=n) for k in ("boxes", "classes", "box_mask")}
    cond = Conditioning.from_batch(frames | {"night": [night_label] * n, "crowdedness": [crowd] * n}, str(boxes))
    latent_size = (spec["height"] // 8, spec["width"] // 8)
    factor = 2 ** (len(model.config.unet.channel_mult) - 1)
    if latent_size[0] % factor or latent_size[1] % factor:
        raise ConfigError(f"{boxes}: width/height: latent size {latent_size} must be divisible by {factor}")
    latents = model.sample(cond, latent_size, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(seed))
    if ae is not None:
        autoencoder = load_model(ae, device=device)
        if not hasattr(autoencoder, "decode_scaled"):
            raise ConfigError(f"{ae}: --ae: {type(autoencoder).__name__} is not an autoencoder")
        with torch.no_grad():
            images = frames_to_uint8(autoencoder.decode_scaled(latents))
    else:
        images = latents_to_uint8(latents)
    out.mkdir(parents=True, exist_ok=True)
    b0 = spec["boxes"][0, 0].numpy(), spec["classes"][0, 0].numpy(), spec["box_mask"][0, 0].numpy()
    for i in range(n):
        write_png(images[i, 0], out / f"sample_{i:03d}.png")
        write_png(draw_boxes(images[i, 0], *b0), out / f"sample_{i:03d}_boxes.png")
    return {"out": str(out), "num_png": 2 * n, "decoded": ae is not None, "night": night_label,
            "crowdedness": crowd}
