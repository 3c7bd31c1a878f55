"""Full tensors to and from the shards of a model trained under FSDP2 (`torch.distributed.fsdp.fully_shard`).

Under FSDP2 every parameter is a `DTensor`: its global name and shape are the model's, each process holds a slice
of dim 0. Its optimizer moments and EMA shadow are `DTensor`s sharded the same way. Checkpoints hold full
tensors in the single-process format (`drivesim.training.checkpoint`), so a run saved under FSDP resumes under
DDP, one process or another process count, and its exports load anywhere:

- saving gathers tensor by tensor (`gather_full`): every process takes part in each all-gather, only the main
  process keeps the result, on the CPU, so the extra device memory is one full tensor at a time;
- loading slices (`shard_like`): every process reads the full checkpoint and keeps its own slice, without
  communication.

A tensor that is not a `DTensor` (one process, DDP, frozen buffers, AdamW's `step` counters) passes through both
unchanged, so code paths without FSDP are the single-process ones.

FSDP2 refuses 0-dim parameters (it shards dim 0); the GLIGEN gates and the AlphaBlender logits are 0-dim. Under
FSDP, `lift_scalars` makes each a `(1,)` parameter under the same name before sharding (the same values, and the
same results: the modules only broadcast them); `drop_lifted` gives them their 0-dim shape back in what is saved,
so checkpoints keep the single-process shapes, and `fits` / `shard_like` let a 0-dim tensor load into a lifted
parameter.
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(t: Any) -> bool:
    """Whether `t` is a `DTensor` (a parameter, gradient, moment or shadow under FSDP2)."""
    if not isinstance(t, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def lift_scalars(model: torch.nn.Module) -> set[str]:
    """Replace every 0-dim parameter of `model` by a `(1,)` parameter with the same value and `requires_grad`,
    under the same name (before the optimizer is built). Returns the names replaced."""
    lifted = set()
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
                lifted.add(f"{module_name}.{name}" if module_name else name)
    return lifted


def drop_lifted(tensors: dict[str, Any], lifted: set[str]) -> dict[str, Any]:
    """`tensors` (full, gathered) with the `lifted` names reshaped to 0-dim, as the model defines them."""
    return {k: v.reshape(()) if k in lifted else v for k, v in tensors.items()}


def fits(value: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether `value` loads into `ref`: the same shape, or 0-dim and `(1,)` either way (a lifted scalar)."""
    a, b = tuple(value.shape), tuple(ref.shape)
    return a == b or {a, b} == {(), (1,)}


def gather_full(tensors: dict[str, Any], keep: bool) -> dict[str, Any]:
    """`tensors` with every `DTensor` replaced by its full value on the CPU (a collective: every process must call
    it with the same keys in the same order). Values that are not `DTensor`s are returned as they are.

    Args:
        tensors: name -> tensor (or any value).
        keep: whether this process keeps the gathered values (the main process); others get an empty dict.
    """
    out = {}
    for name, t in tensors.items():
        if is_sharded(t):
            t = t.full_tensor()
            t = t.cpu() if keep else None
        if keep:
            out[name] = t
    return out


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` (the global tensor, read by every process) as this process's shard of the layout of `ref`, or
    `full` itself when `ref` is not a `DTensor` (reshaped to `ref`'s shape for a lifted scalar, see `fits`). No
    communication: each process slices its own copy."""
    if tuple(full.shape) != tuple(ref.shape) and fits(full, ref):
        full = full.reshape(ref.shape)
    if not is_sharded(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool, names: list[str],
                         lifted: set[str]) -> dict | None:
    """`optimizer.state_dict()` with the sharded moments gathered (a collective, like `gather_full`) and those of
    `lifted` parameters 0-dim again; None on the processes that do not `keep` it.

    Args:
        names: the parameter names in the optimizer's order (the groups' names, concatenated).
    """
    sd = optimizer.state_dict()
    state = {}
    for idx, entry in sd["state"].items():
        full = gather_full(entry, keep)
        if names[int(idx)] in lifted:
            full = {k: v.reshape(()) if k != "step" and isinstance(v, torch.Tensor) else v for k, v in full.items()}
        state[idx] = full
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def shard_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (`state` keyed by the index of the parameter in the groups' order) with each
    tensor of a parameter's shape sliced like that parameter; scalars (AdamW's `step`) stay as they are."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: shard_like(v, p) if k != "step" and isinstance(v, torch.Tensor) and fits(v, p) else v
                      for k, v in entry.items()}
    return {**sd, "state": state}


__all__ = ["is_sharded", "lift_scalars", "drop_lifted", "fits", "gather_full", "shard_like", "full_optimizer_state",
           "shard_optimizer_state"]
