"""Exponential moving average of a model's trainable parameters (kept, checkpointed, exported).

Only trainable parameters are averaged: frozen parameters and buffers never change through the optimizer, so
`ema_state_dict` takes them from the live model. The shadow copies are float32 whatever the training precision,
so a long run at decay 0.9999 does not lose the small increments to rounding. Under FSDP2 the EMA is built from
the sharded parameters, so each shadow is a `DTensor` holding this process's slice (1/N of the memory), updated
without communication; `ema_state_dict` then holds `DTensor`s too (gathered by `sharding.gather_full` to save).
"""

from __future__ import annotations

import torch
from torch import nn

from drivesim.training.sharding import fits, shard_like


class EMA:
    """Shadow copy `s` of each trainable parameter `p`, updated after every optimizer step as
    `s <- decay * s + (1 - decay) * p` (a lerp, deterministic on CPU).

    The effective decay ramps up as `min(decay, (1 + n) / (10 + n))` over the first updates `n` (the
    warm-up used by LDM/sgm `LitEma`), so early EMA weights are not dominated by the random initialisation.

    Args:
        model: the (unwrapped) model; parameter names are those of `model.named_parameters()`.
        decay: target decay in [0, 1); 0 disables averaging (the EMA then equals the live weights).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().to(torch.float32).clone() for n in self.names}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the live trainable parameters of `model` into the average (call after each optimizer step)."""
        params = dict(model.named_parameters())
        weight = 1.0 - self.current_decay()
        shadows = [self.shadow[n] for n in self.names]
        live = [params[n].detach().to(device=s.device, dtype=torch.float32) for n, s in zip(self.names, shadows,
                                                                                           strict=True)]
        torch._foreach_lerp_(shadows, live, weight)
        self.num_updates += 1

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {n: s.to(device) for n, s in self.shadow.items()}
        return self

    def ema_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full `state_dict` with every trainable parameter replaced by its average (cast to the
        parameter's dtype): loadable into the model like `model.safetensors`."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        for n in self.names:
            state[n] = self.shadow[n].to(dtype=state[n].dtype, device=state[n].device)
        return state

    def load_shadow(self, state: dict[str, torch.Tensor], source: str = "ema.safetensors") -> None:
        """Take the averaged values from a full EMA state dict (as written by `ema_state_dict`).

        Raises:
            CheckpointError: a trainable parameter is missing or has another shape.
        """
        from drivesim.errors import CheckpointError

        for n in self.names:
            if n not in state:
                raise CheckpointError(f"{source}: {n}: missing EMA tensor")
            if not fits(state[n], self.shadow[n]):
                raise CheckpointError(f"{source}: {n}: shape {tuple(state[n].shape)}, model has "
                                      f"{tuple(self.shadow[n].shape)}")
            # a shadow sharded like its FSDP2 parameter keeps this process's slice of the full value
            value = state[n].to(dtype=torch.float32, device=self.shadow[n].device)
            self.shadow[n] = shard_like(value, self.shadow[n]).clone()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with their averages (for sampling or export)."""
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])
