"""Box tokens (GLIGEN "grounding tokens"): one token per box slot, per frame.

token = MLP([fourier(x1, y1, x2, y2), class_embedding(class)]) for a valid box, and a learned null token for a
padded slot or a dropped box (GLIGEN `PositionNet` / diffusers `GLIGENTextBoundingboxProjection`, with a learned
class embedding in place of the CLIP text feature).

The token set is always padded to at least `max_boxes` slots with the null token, so a clip with 2 boxes and a
clip with the same 2 boxes plus padding give identical tokens ("a padded slot equals an absent box"). Tokens
carry no slot index, so the box order does not matter to attention.

Leaf module: torch and einops only.
"""

from __future__ import annotations

import math

import torch
from drivesim.bbox_conditioning.classes import check_class_ids
from einops import rearrange
from torch import nn


def fourier_features(xyxy: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """NeRF-style Fourier features of normalised box coordinates.

    Args:
        xyxy: (..., 4) float, normalised [0, 1] image frame (x right, y down).
        num_freqs: F; frequencies pi * 2^k for k = 0 .. F-1 (the finest resolves ~1 / 2^F of the image).
    Returns:
        (..., 4 + 8F) float32: the raw coordinates, then sin and cos of every coordinate at every frequency.
    """
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32, device=xyxy.device)
    angles = rearrange(xyxy.float(), "... c -> ... c 1") * freqs
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return torch.cat([xyxy.float(), rearrange(feats, "... c f -> ... (c f)")], dim=-1)


class BoxTokenizer(nn.Module):
    """Per-frame box sets -> token sequences for gated self-attention.

    Args:
        num_classes: size of the class vocabulary (`classes.CLASS_NAMES`).
        token_dim: d, width of every token.
        fourier_freqs: F of `fourier_features`.
        max_boxes: sequences are padded with the null token to at least this many slots.
        hidden_dim: MLP width (default `token_dim`).
    """

    def __init__(self, num_classes: int, token_dim: int, fourier_freqs: int = 8, max_boxes: int = 16,
                 hidden_dim: int | None = None):
        super().__init__()
        self.num_classes, self.token_dim = num_classes, token_dim
        self.fourier_freqs, self.max_boxes = fourier_freqs, max_boxes
        hidden = hidden_dim or token_dim
        self.class_embedding = nn.Embedding(num_classes, token_dim)
        self.mlp = nn.Sequential(
            nn.Linear(4 + 8 * fourier_freqs + token_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, token_dim),
        )
        self.null_token = nn.Parameter(torch.randn(token_dim) * 0.02)

    def forward(self, boxes: torch.Tensor, classes: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        """Encode boxes.

        Args:
            boxes: (b, t, n, 4) float, normalised xyxy in [0, 1], image frame. Values in invalid slots are ignored
                (may be anything, NaN included).
            classes: (b, t, n) int64 class ids; ignored in invalid slots.
            box_mask: (b, t, n) bool, True for real, not-dropped boxes (padding and dropped boxes are False).
        Returns:
            (b t, m, token_dim) float32 with m = max(n, max_boxes); invalid and padding slots hold the null token.
        Raises:
            ValueError: a valid box has a class id outside [0, num_classes).
        """
        valid = box_mask.bool()
        cls = torch.where(valid, classes, torch.zeros_like(classes))
        check_class_ids(cls, self.num_classes)
        xyxy = torch.where(valid[..., None], boxes.float(), torch.zeros((), device=boxes.device))
        feats = torch.cat([fourier_features(xyxy, self.fourier_freqs), self.class_embedding(cls)], dim=-1)
        tokens = self.mlp(feats)
        tokens = torch.where(valid[..., None], tokens, self.null_token.to(tokens.dtype))
        tokens = rearrange(tokens, "b t n d -> (b t) n d")
        missing = self.max_boxes - tokens.shape[1]
        if missing > 0:
            pad = self.null_token.to(tokens.dtype).expand(tokens.shape[0], missing, self.token_dim)
            tokens = torch.cat([tokens, pad], dim=1)
        return tokens
