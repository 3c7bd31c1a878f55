"""Typed objects that travel through every model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange, repeat

from drivesim.errors import DataError

BATCH_KEYS = ("boxes", "classes", "box_mask", "night", "crowdedness")
"""The batch keys conditioning is read from, everywhere (datasets, latent cache, scenarios, boxes.json); optional:
"interpolation_stage" (the interpolation model) and "track_ids" (labels only: no model reads them)."""


@dataclass
class Conditioning:
    """Everything a drivesim denoiser is conditioned on, for a batch of `b` videos of `t` frames.

    Attributes:
        boxes: (b, t, n, 4) float32, normalised xyxy in [0, 1], image frame (x right, y down).
        classes: (b, t, n) int64, index into `drivesim.bbox_conditioning.classes.CLASS_NAMES`.
        box_mask: (b, t, n) bool, True where a slot holds a real box (padding is False).
        night: (b,) int64, 1 = night, 0 = day.
        crowdedness: (b,) int64, number of vehicles in the clip (bucketed inside the model).
        context_latents: (b, t, c, h, w) scaled latents of the context frames (zeros elsewhere), or None.
        context_mask: (b, t) bool, True for frames given as context (prediction / interpolation), or None.
        context_noise_level: (b,) int64 diffusion timestep the context latents were perturbed to (LVDM), or None.
        interpolation_stage: (b,) int64 interpolation stage label (0: T -> 4T, 1: 4T -> 16T), or None.
        drop_boxes / drop_night / drop_crowdedness: (b,) bool, True where that condition is replaced by its
            learned null (classifier-free guidance); None means nothing dropped.
        image_only: (b,) bool, True for samples that are single images (alpha forced to 1), or None.
        lowres: (b, t, 3, H, W) float32 low-resolution video, noise-augmented and upsampled to the output size
            (the video upsampler's conditioning), or None.
        noise_aug_level: (b,) int64 diffusion level the `lowres` video was noise-augmented to, or None.
    """

    boxes: torch.Tensor
    classes: torch.Tensor
    box_mask: torch.Tensor
    night: torch.Tensor
    crowdedness: torch.Tensor
    context_latents: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    context_noise_level: torch.Tensor | None = None
    interpolation_stage: torch.Tensor | None = None
    drop_boxes: torch.Tensor | None = None
    drop_night: torch.Tensor | None = None
    drop_crowdedness: torch.Tensor | None = None
    image_only: torch.Tensor | None = None
    lowres: torch.Tensor | None = None
    noise_aug_level: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], source: str = "batch") -> Conditioning:
        """The one adapter from a batch to a `Conditioning`: every model, the rollout and sampling use it.

        Args:
            batch: `BATCH_KEYS` ("boxes" (b, t, n, 4) normalised xyxy, image frame; "classes" (b, t, n); "box_mask"
                (b, t, n); "night" (b,); "crowdedness" (b,)) and optionally "interpolation_stage" (b,), as tensors or
                arrays of any dtype (cast to float32 / int64 / bool / int64). Other keys ("latents", "track_ids") are
                ignored.
            source: named in errors (the batch's origin).

        Raises:
            DataError: a key is missing or its shape disagrees with "boxes" (names `source` and the key).
        """
        for key in BATCH_KEYS:
            if key not in batch:
                raise DataError(f"{source}: {key}: missing (conditioning needs {', '.join(BATCH_KEYS)})")
        boxes = torch.as_tensor(batch["boxes"]).float()
        if boxes.ndim != 4 or boxes.shape[-1] != 4:
            raise DataError(f"{source}: boxes: expected (b, t, n, 4), got shape {tuple(boxes.shape)}")
        b, t, n = boxes.shape[:3]
        want = {"classes": (b, t, n), "box_mask": (b, t, n), "night": (b,), "crowdedness": (b,),
                "interpolation_stage": (b,)}
        out = {}
        for key, shape in want.items():
            if key not in batch or batch[key] is None:
                continue
            value = torch.as_tensor(batch[key])
            if tuple(value.shape) != shape:
                raise DataError(f"{source}: {key}: expected shape {shape}, got {tuple(value.shape)}")
            out[key] = value.bool() if key == "box_mask" else value.long()
        return cls(boxes=boxes, **out)

    @classmethod
    def null(cls, b: int, t: int, n: int, device: torch.device | str = "cpu") -> Conditioning:
        """b videos of t frames with no boxes and every label dropped to its learned null (e.g. the upsampler,
        which takes no boxes)."""
        flags = torch.ones(b, dtype=torch.bool, device=device)
        return cls(boxes=torch.zeros(b, t, n, 4, device=device),
                   classes=torch.zeros(b, t, n, dtype=torch.int64, device=device),
                   box_mask=torch.zeros(b, t, n, dtype=torch.bool, device=device),
                   night=torch.zeros(b, dtype=torch.int64, device=device),
                   crowdedness=torch.zeros(b, dtype=torch.int64, device=device),
                   drop_boxes=flags, drop_night=flags, drop_crowdedness=flags)

    def frames_as_images(self) -> Conditioning:
        """(b videos of t frames) -> (b t) single-frame samples: boxes (b t, 1, n, 4), the clip labels repeated per
        frame. Only for conditions without context, stage or drop flags (the image LDM's training batches).

        Raises:
            ValueError: a field that has no per-frame meaning is set.
        """
        extra = [f.name for f in dataclasses.fields(self) if f.name not in BATCH_KEYS and getattr(self, f.name)
                 is not None]
        if extra:
            raise ValueError(f"frames_as_images: {extra[0]} is set; only box and label conditions fold into frames")
        t = self.num_frames
        return Conditioning(boxes=rearrange(self.boxes, "b t n k -> (b t) 1 n k"),
                            classes=rearrange(self.classes, "b t n -> (b t) 1 n"),
                            box_mask=rearrange(self.box_mask, "b t n -> (b t) 1 n"),
                            night=repeat(self.night, "b -> (b t)", t=t),
                            crowdedness=repeat(self.crowdedness, "b -> (b t)", t=t))

    def replace(self, **changes) -> Conditioning:
        """A copy with some fields replaced (fields are tensors; nothing is cloned)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> Conditioning:
        """A copy with every tensor moved to `device`."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_frames(self) -> int:
        return self.boxes.shape[1]
