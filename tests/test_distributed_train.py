"""`drivesim train` under the accelerate configs it supports (docs/accelerate/ddp.yaml, fsdp.yaml; docs/training.md),
2 CPU processes over gloo: a run SIGKILLed inside a step and resumed ends byte for byte where the uninterrupted run
ends, its exports load in one process, and FSDP trains what DDP trains. Unsupported configs (DeepSpeed, FSDP1) are
refused with one line.

The runs are the image LDM of the `tiny` preset on a 16-frame latent cache, launched as a user would:
`accelerate launch --config_file docs/accelerate/<strategy>.yaml --num_processes 2 --mixed_precision no
tests/_train_launch.py train image_ldm ...` (the CLI entry, plus a hang hook for the kill).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from drivesim.errors import ConfigError
from drivesim.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
LAUNCH = Path(__file__).with_name("_train_launch.py")
CONFIGS = {"ddp": REPO / "docs" / "accelerate" / "ddp.yaml", "fsdp": REPO / "docs" / "accelerate" / "fsdp.yaml"}
# 16 frames / (2 processes x batch 2): 4 optimizer steps per epoch, so 6 steps cross an epoch boundary
STEPS, CHECKPOINT_EVERY, HANG_AT = 6, 2, 4  # loss call 4 is step 4: after the step-2 checkpoint, step 3 is lost

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate.commands.launch") is None,
                                reason="accelerate not installed")


def _cache(path: Path) -> Path:
    from drivesim.bbox_conditioning.boxes import pack_boxes
    from drivesim.datasets.latent_cache import LatentCacheWriter

    rng = np.random.default_rng(0)
    with LatentCacheWriter(path, encoder_id="test", scale_factor=0.5, max_boxes=8) as w:
        for i in range(4):
            boxes = [[(0, 0, 4.0, 4.0, 30.0, 20.0)] for _ in range(4)]
            w.add_clip(f"c{i}", rng.standard_normal((4, 4, 4, 8)).astype(np.float32), pack_boxes(boxes, 64, 32, 8),
                       night=i % 2, crowdedness=1, fps=10.0, split="train", width=64, height=32)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(strategy: str, cache: Path, out: Path, precision: str = "no", steps: int = STEPS,
            **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[strategy]),
           "--num_processes", "2", "--mixed_precision", precision, "--main_process_port", str(_free_port()),
           str(LAUNCH), "train", "image_ldm", "--preset", "tiny", "--data", str(cache), "--out", str(out),
           "--max-steps", str(steps), "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}",
           "--set", "train.keep_checkpoints=0", "--mixed-precision", precision, "--no-progress"]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        full_env.pop(k, None)
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (torchrun starts its workers in their own sessions,
    so a process-group kill would miss them): a node that loses power."""
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    p.wait(30)


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def _straight_killed_resumed(strategy: str, tmp: Path) -> tuple[Path, Path]:
    """An uninterrupted run and one SIGKILLed inside step 4 (after the step-2 checkpoint) then resumed, launched
    together with `strategy`'s config; returns their run folders."""
    cache = _cache(tmp / "latents.h5")
    straight, killed, marker = tmp / "straight", tmp / "killed", tmp / "hang"
    p_straight = _launch(strategy, cache, straight)
    p_killed = _launch(strategy, cache, killed, DRIVESIM_TEST_HANG_AT=str(HANG_AT), DRIVESIM_TEST_MARKER=str(marker))
    deadline = time.monotonic() + 240
    while not all(Path(f"{marker}.rank{r}").exists() for r in (0, 1)):
        if p_killed.poll() is not None:
            pytest.fail(p_killed.communicate()[0][-5000:])
        assert time.monotonic() < deadline, "the run never reached the hang point"
        time.sleep(0.05)
    _kill_tree(p_killed)
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == "step_000002"
    out = p_straight.communicate(timeout=300)[0]
    assert p_straight.returncode == 0, out[-5000:]
    assert "2 process(es)" in out
    assert ("(FSDP2, parameters sharded)" in out) == (strategy == "fsdp"), out[-3000:]

    resumed = _launch(strategy, cache, killed)
    out_resumed = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out_resumed[-5000:]
    assert "resuming from" in out_resumed and "step_000002" in out_resumed, out_resumed[-3000:]
    return straight, killed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """strategy -> (uninterrupted run, killed and resumed run), each launched once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(strategy: str) -> tuple[Path, Path]:
        if strategy not in done:
            done[strategy] = _straight_killed_resumed(strategy, tmp_path_factory.mktemp(strategy))
        return done[strategy]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigkill_and_resume_under_an_accelerate_config_is_bytewise_the_uninterrupted_run(runs, strategy):
    # ~30 s (ddp) / ~40-55 s (fsdp: all-gathers per U-Net block over gloo) on a busy 2-core CPU
    straight, killed = runs(strategy)
    # every checkpoint (weights, EMA, AdamW moments, scheduler, data position, both ranks' RNG) and both exports
    steps = [f"step_{s:06d}" for s in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)]
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*")) == steps
    for folder in [Path("checkpoints") / s for s in steps] + [Path("model"), Path("model-ema")]:
        a, b = _files(straight / folder), _files(killed / folder)
        assert a.keys() == b.keys(), folder
        for name in a:
            assert a[name] == b[name], f"{folder}/{name} differs from the uninterrupted run"
    assert (killed / "checkpoints" / "step_000006" / "rng_rank1.safetensors").is_file()

    # the exports load in this (single) process, in the model's own shapes (0-dim gates, lifted only under FSDP)
    model = ckpt.load_model(killed / "model", "image_ldm")
    last = load_file(str(killed / "checkpoints" / "step_000006" / ckpt.MODEL_NAME))
    state = model.state_dict()
    assert state.keys() == last.keys() and all(torch.equal(state[k], last[k]) for k in state)
    assert state["unet.middle_block.layers.2.gate_attn"].shape == ()
    ema = ckpt.load_model(killed / "model-ema", "image_ldm")
    assert not torch.equal(ema.state_dict()["unet.out_conv.weight"], state["unet.out_conv.weight"])
    first = load_file(str(killed / "checkpoints" / "step_000002" / ckpt.MODEL_NAME))
    assert not torch.equal(first["unet.out_conv.weight"], last["unet.out_conv.weight"]), "the run did not train"


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains(runs):
    # Not bit for bit: FSDP reduce-scatters and sums the gradient norm over shards (another float summation order
    # than DDP's all-reduce). AdamW divides each gradient by its running RMS, so where gradients are ~1e-12 (the
    # zero-initialised output biases) a rounding difference moves the update by a fraction of lr = 1e-4: measured
    # <= 1.6e-7 after 6 steps, while training moves the weights by ~1e-4 per step. atol = 1e-6 (1% of one step).
    final = Path("checkpoints") / "step_000006"
    for name in (ckpt.MODEL_NAME, ckpt.EMA_NAME, ckpt.OPTIMIZER_TENSORS):
        ddp, fsdp = (load_file(str(runs(s)[0] / final / name)) for s in ("ddp", "fsdp"))
        assert ddp.keys() == fsdp.keys()
        for k in ddp:
            torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    # the tolerance is far below what training changes
    first = load_file(str(runs("ddp")[0] / "checkpoints" / "step_000002" / ckpt.MODEL_NAME))
    last = load_file(str(runs("ddp")[0] / final / ckpt.MODEL_NAME))
    assert max((last[k] - first[k]).abs().max().item() for k in last) > 1e-4


@pytest.mark.slow
def test_fsdp_bf16_trains_and_saves_fp32(tmp_path):
    # ~10-15 s. accelerate's FSDP2 bf16 policy ran the models without autocast and failed on their fp32 timestep
    # embeddings; the loop's policy gathers bf16 weights and runs the forward under autocast, as DDP does
    p = _launch("fsdp", _cache(tmp_path / "latents.h5"), tmp_path / "run", precision="bf16", steps=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out[-5000:]
    assert "(FSDP2, parameters sharded)" in out and "mixed precision bf16" in out
    last = load_file(str(tmp_path / "run" / "checkpoints" / "step_000002" / ckpt.MODEL_NAME))
    exported = ckpt.load_model(tmp_path / "run" / "model", "image_ldm").state_dict()
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in last.values())
    assert all(torch.equal(exported[k], last[k]) for k in last)


def test_deepspeed_and_fsdp1_are_refused_with_one_line(monkeypatch, tmp_path):
    from drivesim.configs import TrainConfig
    from drivesim.training import loop

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported"):
        loop._make_accelerator(TrainConfig(), tmp_path, False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    from accelerate.utils import DistributedType

    fsdp1 = SimpleNamespace(device=torch.device("cuda"), state=SimpleNamespace(
        distributed_type=DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=1), mixed_precision="no"))
    with pytest.raises(ConfigError, match="fsdp_version: 1 is not supported; set fsdp_version: 2"):
        loop._fsdp_setup(fsdp1)


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp, fsdp = (load_config_from_file(str(CONFIGS[s])) for s in ("ddp", "fsdp"))
    assert str(ddp.distributed_type).endswith("MULTI_GPU")
    assert str(fsdp.distributed_type).endswith("FSDP")
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "UNetBlock"
