"""Reliability: SIGKILL a short training run at 20 random moments; every resume ends bitwise equal to the
uninterrupted run.

The run is the training engine's toy worker (`tests/_engine_toy.py`: dropout, input noise and python/numpy RNG
draws inside `loss()`, a frozen layer, gradient accumulation 2, cosine LR with warm-up, EMA, a checkpoint every
2 optimizer steps, and an epoch boundary every 3 steps), with a 3 ms sleep per micro-batch standing in for
compute so kill moments spread over start-up, steps and checkpoint writes.

Workers are forked from a `multiprocessing` forkserver that has already imported torch and the training loop, so
a start costs milliseconds instead of the ~3 s of a fresh interpreter; each worker is a real process killed with
SIGKILL (`os.kill(pid, 9)`) after a delay drawn from a seeded RNG, uniform over the uninterrupted run's duration.
A killed run is restarted (it resumes from its newest complete checkpoint) and killed again until a start
survives to the end; then every checkpoint it kept (model, EMA, optimizer, scheduler, trainer state, RNG states)
and its exported model must equal the uninterrupted run's, byte for byte; then a fresh run directory starts,
until 20 kills have landed.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import drivesim
from drivesim.errors import CheckpointError
from drivesim.training import checkpoint as ckpt

TOY_PATH = Path(__file__).with_name("_engine_toy.py")
KILLS = 20
SEED = 20261121
ARGS = ["--max-steps", "12", "--checkpoint-every", "2", "--batch-size", "4", "--grad-accum", "2", "--n", "24"]

# Runs inside a forkserver child: load the toy worker by path, slow its loss down a little, send output to a log
# file (the parent's stdout belongs to pytest), run the engine.
_CHILD = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("_engine_toy", {toy!r})
toy = importlib.util.module_from_spec(spec)
sys.modules["_engine_toy"] = toy
spec.loader.exec_module(toy)
_loss = toy.ToyModel.loss
def slow_loss(self, batch):
    time.sleep(0.003)
    return _loss(self, batch)
toy.ToyModel.loss = slow_loss
log = os.open({log!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log, 1)
os.dup2(log, 2)
sys.exit(toy.main({argv!r}))
"""


def _load_toy():
    if "_engine_toy" in sys.modules:
        return sys.modules["_engine_toy"]
    spec = importlib.util.spec_from_file_location("_engine_toy", TOY_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_engine_toy"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "safetensors.torch", "accelerate", "diffusers.optimization",
                                  "drivesim.training.loop"])
    return ctx


def _start(ctx, out: Path, log: Path, *extra: str):
    code = _CHILD.format(toy=str(TOY_PATH), log=str(log), argv=[str(out), *ARGS, *extra])
    p = ctx.Process(target=exec, args=(code, {"__name__": "__drivesim_worker__"}), daemon=True)
    p.start()
    return p


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_same_run(ref: Path, got: Path) -> None:
    steps = sorted(p.name for p in (ref / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == sorted(p.name for p in (got / "checkpoints").iterdir() if p.name.startswith("step_")), got
    for step in steps:
        a, b = _files(ref / "checkpoints" / step), _files(got / "checkpoints" / step)
        assert a.keys() == b.keys(), f"{got}/{step}: files differ"
        for name in a:
            assert a[name] == b[name], f"{got}/checkpoints/{step}/{name} differs from the uninterrupted run"
    for export in ("model", "model-ema"):
        a, b = _files(ref / export), _files(got / export)
        assert a == b, f"{got}/{export} differs from the uninterrupted run"


def test_twenty_random_sigkills_each_resume_is_bitwise_identical(forkserver, tmp_path):
    # two uninterrupted runs: the first also boots the forkserver; they must agree (the baseline is
    # deterministic), and the second's duration scales the kill delays
    for name in ("straight_0", "straight"):
        t0 = time.monotonic()
        p = _start(forkserver, tmp_path / name, tmp_path / f"{name}.log")
        p.join(120)
        duration = time.monotonic() - t0
        assert p.exitcode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    ref = tmp_path / "straight"
    assert ckpt.latest_checkpoint(ref / "checkpoints").name == "step_000012"
    assert ckpt.trained_steps(ref) == 12
    _assert_same_run(tmp_path / "straight_0", ref)

    rng = random.Random(SEED)
    kills, runs, landed_mid_run, left_partial = [], 0, 0, 0
    deadline = time.monotonic() + 120
    while len(kills) < KILLS:
        out = tmp_path / f"killed_{runs}"
        runs += 1
        for _attempt in range(100):
            assert time.monotonic() < deadline, f"too slow: {len(kills)} kills so far"
            log = tmp_path / f"{out.name}.log"
            before = ckpt.latest_checkpoint(out / "checkpoints")
            delay = rng.uniform(0.0, duration) if len(kills) < KILLS else None
            p = _start(forkserver, out, log)
            p.join(delay)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(30)
            if p.exitcode == -signal.SIGKILL:  # else it finished between the liveness check and the kill
                after = ckpt.latest_checkpoint(out / "checkpoints")
                kills.append({"run": out.name, "delay_s": round(delay, 3), "from": before and before.name,
                              "to": after and after.name})
                landed_mid_run += after is not None and after != before
                folder = out / "checkpoints"
                left_partial += folder.is_dir() and any(c.name.startswith(".tmp-") for c in folder.iterdir())
                continue
            assert p.exitcode == 0, log.read_text()[-3000:]
            break
        else:
            pytest.fail(f"{out}: never finished")
        # the run survived a start: it must end exactly where the uninterrupted run ended
        result = json.loads(log.read_text().strip().splitlines()[-1])
        assert result["step"] == 12, result
        _assert_same_run(ref, out)
    assert len(kills) == KILLS
    # the kills must not all land in start-up: many must interrupt a run that had made progress
    assert landed_mid_run >= KILLS // 4, (duration, kills)
    print(json.dumps({"straight_run_s": round(duration, 3), "runs": runs, "kills": kills,
                      "kills_after_progress": landed_mid_run, "kills_leaving_tmp_checkpoint": left_partial}))


def test_resumed_checkpoints_load(forkserver, tmp_path):
    """A run killed twice inside a step (after the step-4 and step-6 checkpoints), then finished: its exported
    models and every training checkpoint load, and the exports equal the last checkpoint's weights."""
    _load_toy()  # registers the toy model class for drivesim.load
    out, log = tmp_path / "run", tmp_path / "run.log"
    marker = tmp_path / "run.hang"
    # loss() call 9 is step 5 of a fresh run; after resuming from step 4, call 5 is step 7 (step 6 saved)
    for hang_at, resumed_from in (("9", "step_000004"), ("5", "step_000006")):
        marker.unlink(missing_ok=True)
        p = _start(forkserver, out, log, "--hang-at-call", hang_at)
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert p.is_alive(), log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker never reached the hang point"
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert ckpt.latest_checkpoint(out / "checkpoints").name == resumed_from
    p = _start(forkserver, out, log)
    p.join(120)
    assert p.exitcode == 0, log.read_text()[-3000:]
    model = drivesim.load(out / "model")
    ema = drivesim.load(out / "model-ema")
    last = ckpt.latest_checkpoint(out / "checkpoints")
    assert last.name == "step_000012"
    for exported, weights in ((model, ckpt.load_model(last)), (ema, ckpt.load_model(last, ema=True))):
        sa, sb = exported.state_dict(), weights.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(model.state_dict()["net.0.weight"], ema.state_dict()["net.0.weight"])
    steps = sorted((out / "checkpoints").glob("step_*"))
    assert [s.name for s in steps] == [f"step_{k:06d}" for k in (2, 4, 6, 8, 10, 12)]
    for step in steps:  # every checkpoint written by the killed and resumed starts loads
        ckpt.load_model(step)
        ckpt.load_model(step, ema=True)


def test_trained_steps_names_a_folder_without_checkpoints(tmp_path):
    (tmp_path / "checkpoints" / "step_000004").mkdir(parents=True)  # no completion marker: a checkpoint cut short
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        ckpt.trained_steps(tmp_path)
