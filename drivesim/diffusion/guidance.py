"""Guidance: one small object applied to the WHOLE model output (sgm `VanillaCFG`).

General form, for a full condition c and terms i with a "weakening" transform W_i and a scale s_i:

    out = f(x; c) + sum_i (s_i - 1) * (f(x; c) - f(x; W_i(c)))

With one term this is exactly the familiar shapes:
- classifier-free guidance on labels and boxes: W drops them, out = u + s (c - u) (Ho & Salimans 2022);
- context guidance (Video LDM): W removes the context frames, f(z) + s (f(z; c_S) - f(z));
- LVDM unconditional guidance: (1 + w) eps_c - w eps_u, i.e. s = 1 + w with W = all-zero context mask
  (`GuidanceTerm.lvdm(w, W)`).

Every channel of the output is guided: DiT's sampler guided only the first 3 of its channels, a bug we test
against. Terms with scale 1 cost nothing (their forward pass is skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drivesim.configs import DiffusionConfig
from drivesim.types import Conditioning

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def drop_labels_and_boxes(cond: Conditioning) -> Conditioning:
    """Condition with every box and every label replaced by its learned null (the CFG unconditional branch)."""
    flags = torch.ones(cond.batch_size, dtype=torch.bool, device=cond.boxes.device)
    return cond.replace(drop_boxes=flags, drop_night=flags, drop_crowdedness=flags)


@dataclass(frozen=True)
class GuidanceTerm:
    """One guidance term: `weaken` maps the full condition to the one it is contrasted with; `scale` is s."""

    weaken: Callable[[Any], Any]
    scale: float
    name: str = ""

    @classmethod
    def classifier_free(cls, scale: float) -> GuidanceTerm:
        """CFG on boxes + day/night + crowdedness: u + s (c - u)."""
        return cls(drop_labels_and_boxes, scale, "labels_and_boxes")

    @classmethod
    def lvdm(cls, w: float, weaken: Callable[[Any], Any], name: str = "lvdm_unconditional") -> GuidanceTerm:
        """LVDM unconditional guidance (1 + w) eps_c - w eps_u, i.e. scale = 1 + w."""
        return cls(weaken, 1.0 + w, name)


class Guidance:
    """Applies a list of `GuidanceTerm`s to a model function; with no terms it is the plain conditional model."""

    def __init__(self, terms: Sequence[GuidanceTerm] = ()):
        self.terms = tuple(terms)

    @classmethod
    def from_config(cls, config: DiffusionConfig, scale: float | None = None) -> Guidance:
        """Classifier-free guidance on labels/boxes with `scale` (default `config.guidance_scale`)."""
        s = config.guidance_scale if scale is None else scale
        return cls([GuidanceTerm.classifier_free(s)])

    def __call__(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Guided output, same shape as `model_fn(x_t, t, cond)` (e.g. (b, t, c, h, w) epsilon or v)."""
        out_c = model_fn(x_t, t, cond)
        out = out_c
        for term in self.terms:
            if term.scale == 1.0:
                continue
            out_w = model_fn(x_t, t, term.weaken(cond))
            out = out + (term.scale - 1.0) * (out_c - out_w)
        return out

    def __repr__(self) -> str:
        return "Guidance(" + ", ".join(f"{t.name or t.weaken.__name__}={t.scale:g}" for t in self.terms) + ")"


def drop_conditions(cond: Conditioning, unet_config, generator: torch.Generator | None = None) -> Conditioning:
    """Classifier-free-guidance dropout for training: each sample's day/night, crowdedness and box set (tokens and
    layout) are replaced by their learned nulls independently with `drop_night_p`, `drop_crowdedness_p`,
    `boxes.drop_boxes_p`, and all three together with `drop_all_p` (so the all-null branch that label/box guidance
    subtracts is trained, not seen by 0.1^3 of the samples).

    Args:
        cond: the batch's `Conditioning` (b samples).
        unet_config: the model's `UNetConfig` (the probabilities).
        generator: CPU generator for the draws (None: the global RNG). With `drop_all_p` = 0 the draws are exactly
            those of a (3, b) uniform tensor, as before the joint drop existed.

    Returns:
        `cond` with `drop_night`, `drop_crowdedness`, `drop_boxes` (b,) bool set.
    """
    b, device, cfg = cond.batch_size, cond.boxes.device, unet_config
    u = torch.rand(4 if cfg.drop_all_p > 0 else 3, b, generator=generator).to(device)
    all_null = u[3] < cfg.drop_all_p if cfg.drop_all_p > 0 else torch.zeros(b, dtype=torch.bool, device=device)
    return cond.replace(drop_night=(u[0] < cfg.drop_night_p) | all_null,
                        drop_crowdedness=(u[1] < cfg.drop_crowdedness_p) | all_null,
                        drop_boxes=(u[2] < cfg.boxes.drop_boxes_p) | all_null)
