"""Typed objects that travel through every model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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
        stage: (b,) int64 interpolation stage label (0: T -> 4T, 1: 4T -> 16T), or None.
        drop_boxes / drop_night / drop_crowdedness: (b,) bool, True where that condition is replaced by its
            learned null (classifier-free guidance); None means nothing dropped.
        image_only: (b,) bool, True for samples that are single images (alpha forced to 1), or None.
    """

    boxes: torch.Tensor
    classes: torch.Tensor
    box_mask: torch.Tensor
    night: torch.Tensor
    crowdedness: torch.Tensor
    context_latents: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    context_noise_level: torch.Tensor | None = None
    stage: torch.Tensor | None = None
    drop_boxes: torch.Tensor | None = None
    drop_night: torch.Tensor | None = None
    drop_crowdedness: torch.Tensor | None = None
    image_only: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> Conditioning:
        """Build from a dataset batch dict (keys "boxes", "classes", "box_mask", "night", "crowdedness")."""
        return cls(
            boxes=batch["boxes"],
            classes=batch["classes"],
            box_mask=batch["box_mask"],
            night=batch["night"],
            crowdedness=batch["crowdedness"],
        )

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
