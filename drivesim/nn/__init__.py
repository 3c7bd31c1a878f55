"""Shared neural-network building blocks: spatial blocks (`blocks`) and temporal layers (`temporal`)."""

from drivesim.nn.blocks import (
    Downsample,
    GroupNorm32,
    ResBlock,
    SpatialSelfAttention,
    Upsample,
    timestep_embedding,
    zero_module,
)
from drivesim.nn.temporal import AlphaBlender, TemporalAttention, TemporalConvBlock, force_alpha_one

__all__ = [
    "AlphaBlender",
    "Downsample",
    "GroupNorm32",
    "ResBlock",
    "SpatialSelfAttention",
    "TemporalAttention",
    "TemporalConvBlock",
    "Upsample",
    "force_alpha_one",
    "timestep_embedding",
    "zero_module",
]
