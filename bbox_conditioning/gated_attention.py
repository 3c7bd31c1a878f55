"""Gated self-attention (GLIGEN, Li et al. 2023, eq. 8; diffusers `GatedSelfAttentionDense`).

Visual tokens v and box tokens g are concatenated and attend jointly; only the visual outputs are kept:

    v = v + tanh(gamma_attn) * TS(SelfAttn(LN([v, W g])))     (TS keeps the first |v| tokens)
    v = v + tanh(gamma_ff)   * FF(LN(v))

Both gates start at 0 (default `gate_init`), so a freshly inserted layer is the identity and the output does not
depend on the boxes (exactly: 0 * finite = 0). Attention is `torch.nn.functional.scaled_dot_product_attention`
without a mask: null tokens take part like every other token, as in GLIGEN.

Leaf module: torch and einops only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class GatedSelfAttention(nn.Module):
    """Joint self-attention of visual tokens with box tokens behind tanh gates initialised at 0.

    Args:
        dim: channels of the visual tokens (C).
        context_dim: width of the box tokens (d); projected to `dim`.
        num_heads: attention heads (`dim` must be divisible by it).
        ff_mult: hidden width multiplier of the feed-forward branch.
        gate_init: initial value of both gates (GLIGEN: 0, the identity; tanh(gate_init) of the branches is mixed
            in from the start otherwise).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, ff_mult: int = 4, gate_init: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.context_proj = nn.Linear(context_dim, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.gate_attn = nn.Parameter(torch.full((), float(gate_init)))
        self.gate_ff = nn.Parameter(torch.full((), float(gate_init)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x: (N, L, C) visual tokens; tokens: (N, m, d) box tokens -> (N, L, C), dtype of `x`."""
        num_visual = x.shape[1]
        joint = self.norm_attn(torch.cat([x, self.context_proj(tokens.to(x.dtype))], dim=1))
        q, k, v = rearrange(self.qkv(joint), "n l (three heads d) -> three n heads l d", three=3,
                            heads=self.num_heads)
        attn = rearrange(F.scaled_dot_product_attention(q, k, v), "n heads l d -> n l (heads d)")
        x = x + torch.tanh(self.gate_attn) * self.attn_out(attn[:, :num_visual])
        return x + torch.tanh(self.gate_ff) * self.ff(self.norm_ff(x))
