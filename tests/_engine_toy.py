"""Toy model + synthetic data for the training-engine tests, and a worker script for subprocess runs.

Imported by tests/test_training_engine.py (by file path) and run as a script by its subprocess tests
(`python tests/_engine_toy.py ...` or under `torchrun`). Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from drivesim.registry import MODEL_REGISTRY, register_model


@dataclass(frozen=True)
class ToyConfig:
    in_dim: int = 8
    hidden: int = 32
    dropout: float = 0.1
    input_noise: float = 0.1  # torch RNG draws inside loss(), like diffusion noise
    host_rng: bool = True  # python `random` + numpy draws inside loss(), to exercise their checkpointed states
    freeze_embed: bool = True


class ToyModel(nn.Module):
    """MLP regressor with a frozen input embedding, dropout and RNG draws in its loss."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.in_dim, config.hidden)
        self.embed.requires_grad_(not config.freeze_embed)
        self.net = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                                 nn.Linear(config.hidden, 1))
        self.seen: list[int] = []
        self.calls = 0
        self.nan_calls: set[int] = set()  # loss() returns NaN at these call numbers (tests)
        self.hang_at_call: int | None = None  # loss() writes hang_marker and sleeps at this call (kill tests)
        self.hang_marker: Path | None = None

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        if self.hang_at_call is not None and self.calls == self.hang_at_call:
            self.hang_marker.write_text(str(self.calls))
            time.sleep(600)
        self.seen.extend(batch["index"].tolist())
        x, y = batch["x"], batch["y"]
        x = x + self.config.input_noise * torch.randn_like(x)
        scale = 1.0 + 0.01 * (random.random() + float(np.random.rand())) if self.config.host_rng else 1.0
        pred = self.net(self.embed(x)).squeeze(-1)
        loss = ((pred - y) ** 2).mean() * scale
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}


if "engine_toy" not in MODEL_REGISTRY:
    ToyModel = register_model("engine_toy", ToyConfig)(ToyModel)
else:  # loaded twice under different module names (pytest + a direct import): keep the first class
    ToyModel = MODEL_REGISTRY["engine_toy"]


class ToyDataset(Dataset):
    """`n` fixed samples {"index": int64, "x": (in_dim,) float32, "y": () float32}."""

    def __init__(self, n: int = 64, in_dim: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = torch.sin(self.x.sum(-1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), "x": self.x[i], "y": self.y[i]}


def main(argv: list[str] | None = None) -> int:
    from drivesim.configs import TrainConfig
    from drivesim.training.loop import train

    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--deterministic-model", action="store_true", help="no dropout / noise / host RNG")
    ap.add_argument("--hang-at-call", type=int, default=None)
    ap.add_argument("--seen-file", default=None)
    ap.add_argument("--nan-at", default="", help="comma-separated loss() call numbers that return NaN")
    ap.add_argument("--nan-rank", type=int, default=None, help="only this process returns NaN (default: all)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ToyConfig(dropout=0.0, input_noise=0.0, host_rng=False) if a.deterministic_model else ToyConfig()
    model = ToyModel(cfg)
    if a.nan_rank is None or a.nan_rank == int(os.environ.get("RANK", "0")):
        model.nan_calls = {int(c) for c in a.nan_at.split(",") if c}
    out = Path(a.out_dir)
    if a.hang_at_call is not None:
        model.hang_at_call, model.hang_marker = a.hang_at_call, out.parent / f"{out.name}.hang"
    tc = TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size, grad_accum_steps=a.grad_accum, lr=3e-3,
                     warmup_steps=2, lr_schedule="cosine", checkpoint_every=a.checkpoint_every, log_every=1,
                     ema_decay=0.9, tracker=None, seed=7, keep_checkpoints=0)
    res = train(model, ToyDataset(a.n), tc, out, progress=False)
    if a.seen_file:
        rank = int(os.environ.get("RANK", "0"))
        Path(f"{a.seen_file}.rank{rank}").write_text(json.dumps(model.seen))
    print(json.dumps({"step": res.step, "start_step": res.start_step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
