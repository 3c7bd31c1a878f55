"""Training engine: exact resume after SIGKILL, 2-process DDP == 1 process, NaN skipping, frozen parameters,
atomic checkpoints, checkpoint/config bad input, YAML round trip and the train/config CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drivesim
from drivesim.configs import PRESETS, Preset, TrainConfig, dump_yaml, get_preset, load_yaml, override, to_dict
from drivesim.errors import CheckpointError, ConfigError, WriteError
from drivesim.training import checkpoint as ckpt
from drivesim.training.loop import NonFiniteLossError, build_param_groups, train

TOY_PATH = Path(__file__).with_name("_engine_toy.py")


def _load_toy():
    if "_engine_toy" in sys.modules:
        return sys.modules["_engine_toy"]
    spec = importlib.util.spec_from_file_location("_engine_toy", TOY_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_engine_toy"] = mod
    spec.loader.exec_module(mod)
    return mod


toy = _load_toy()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _worker(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(TOY_PATH), str(out), *args]


def _tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def _quick_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=4, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1, ema_decay=0.9,
                tracker=None, seed=3, keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


def _toy_model(**cfg_kw):
    torch.manual_seed(0)
    return toy.ToyModel(toy.ToyConfig(**cfg_kw))


# --------------------------------------------------------------------------------------------------------------
# exact resume and distributed equivalence (real subprocesses)
# --------------------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    # 24 samples / batch 4 / grad accumulation 2: 3 optimizer steps per epoch, so the run crosses epochs, and the
    # kill lands inside step 5 (micro-batch call 9), after the step-3 checkpoint.
    common = ["--max-steps", "8", "--checkpoint-every", "3", "--batch-size", "4", "--grad-accum", "2", "--n", "24"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p_straight = subprocess.Popen(_worker(straight, *common), env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    p_killed = subprocess.Popen(_worker(killed, *common, "--hang-at-call", "9"), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = tmp_path / "killed.hang"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p_killed.poll() is None, p_killed.communicate()[0]
        assert time.monotonic() < deadline, "worker never reached the hang point"
        time.sleep(0.05)
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == "step_000003"
    os.kill(p_killed.pid, signal.SIGKILL)
    p_killed.wait()
    assert p_killed.returncode == -signal.SIGKILL
    out_straight = p_straight.communicate(timeout=120)[0]
    assert p_straight.returncode == 0, out_straight

    resumed = subprocess.run(_worker(killed, *common), env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"step": 8, "start_step": 3}

    a, b = straight / "checkpoints" / "step_000008", killed / "checkpoints" / "step_000008"
    for name in (ckpt.MODEL_NAME, ckpt.EMA_NAME, ckpt.OPTIMIZER_TENSORS, "rng_rank0.safetensors"):
        ta, tb = _tensors(a, name), _tensors(b, name)
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{name}:{k} differs after resume"
    for name in (ckpt.SCHEDULER_JSON, ckpt.TRAINER_STATE, ckpt.OPTIMIZER_JSON, "rng_rank0.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    # the run really trained: weights moved away from the initial ones
    torch.manual_seed(0)
    init = toy.ToyModel(toy.ToyConfig())
    assert not torch.equal(_tensors(a, ckpt.MODEL_NAME)["net.0.weight"], init.net[0].weight.detach())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("accelerate.commands.launch") is None, reason="accelerate not installed")
def test_two_process_ddp_matches_one_process_and_shards_are_disjoint(tmp_path):
    # step 2 has a NaN loss on rank 0 only: both processes must skip it together (no hang, no desync), exactly as
    # the one-process run skips its step 2
    common = ["--max-steps", "4", "--checkpoint-every", "4", "--n", "40", "--deterministic-model", "--nan-at", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), str(TOY_PATH), str(two), *common, "--batch-size", "4",
              "--nan-rank", "0", "--seen-file", str(tmp_path / "seen_two")]
    p_two = subprocess.Popen(launch, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r_one = subprocess.run(_worker(one, *common, "--batch-size", "8", "--seen-file", str(tmp_path / "seen_one")),
                           env=_env(), capture_output=True, text=True, timeout=180)
    out_two = p_two.communicate(timeout=180)[0]
    assert r_one.returncode == 0, r_one.stdout + r_one.stderr
    assert p_two.returncode == 0, out_two
    assert "2 process(es)" in out_two

    a, b = one / "checkpoints" / "step_000004", two / "checkpoints" / "step_000004"
    for name in (ckpt.MODEL_NAME, ckpt.EMA_NAME, ckpt.OPTIMIZER_TENSORS):
        ta, tb = _tensors(a, name), _tensors(b, name)
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6, msg=f"{name}:{k}")
    seen0 = json.loads((tmp_path / "seen_two.rank0").read_text())
    seen1 = json.loads((tmp_path / "seen_two.rank1").read_text())
    seen_one = json.loads((tmp_path / "seen_one.rank0").read_text())
    assert len(seen0) == len(seen1) == 16
    assert not set(seen0) & set(seen1), "the two processes saw overlapping samples"
    assert sorted(seen0 + seen1) == sorted(seen_one)
    assert (b / "rng_rank1.safetensors").is_file()
    for run in (a, b):
        assert json.loads((run / ckpt.TRAINER_STATE).read_text())["bad_steps_total"] == 1


# --------------------------------------------------------------------------------------------------------------
# in-process engine behaviour
# --------------------------------------------------------------------------------------------------------------


def test_nan_steps_are_skipped_and_training_stops_with_last_good_checkpoint(tmp_path):
    model = _toy_model()
    model.nan_calls = {3}  # one bad step: skipped, training goes on
    res = train(model, toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path / "once", progress=False)
    assert res.step == 4 and res.bad_steps == 1
    state = json.loads((tmp_path / "once" / "checkpoints" / "step_000004" / ckpt.TRAINER_STATE).read_text())
    assert state["bad_steps_total"] == 1

    model = _toy_model()
    model.nan_calls = set(range(5, 100))
    out = tmp_path / "diverge"
    with pytest.raises(NonFiniteLossError) as err:
        train(model, toy.ToyDataset(32), _quick_cfg(max_steps=20, max_bad_steps=3), out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "3 consecutive" in msg and "step_000004" in msg
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest.name == "step_000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    saved = _tensors(latest, ckpt.MODEL_NAME)
    for k, v in model.state_dict().items():  # skipped steps changed nothing
        assert torch.equal(saved[k], v), k


def test_frozen_parameters_get_no_gradient_and_are_not_optimized(tmp_path):
    model = _toy_model(freeze_embed=True)
    embed_before = {k: v.clone() for k, v in model.embed.state_dict().items()}
    net_before = model.net[0].weight.detach().clone()
    groups, names = build_param_groups(model, _quick_cfg())
    assert all(not n.startswith("embed.") for g in names for n in g) and len(names[0]) == 4
    assert all(p.requires_grad for g in groups for p in g["params"])
    train(model, toy.ToyDataset(32), _quick_cfg(max_steps=3), tmp_path, progress=False)
    for k, v in model.embed.state_dict().items():
        assert torch.equal(v, embed_before[k]), k
    assert model.embed.weight.grad is None and model.embed.bias.grad is None
    assert not torch.equal(model.net[0].weight.detach(), net_before)
    opt_meta = json.loads((tmp_path / "checkpoints" / "step_000003" / ckpt.OPTIMIZER_JSON).read_text())
    assert not any(n.startswith("embed.") for g in opt_meta["param_names"] for n in g)


def test_crash_while_writing_a_checkpoint_leaves_previous_latest_valid(tmp_path, monkeypatch):
    train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), tmp_path, progress=False)
    real = ckpt._save_tensors
    calls = {"n": 0}

    def crash_on_second_file(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # rng, model written; crash before the EMA file of step 4
            raise OSError("disk full (simulated)")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "_save_tensors", crash_on_second_file)
    with pytest.raises(OSError, match="simulated"):
        train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path, progress=False)
    monkeypatch.setattr(ckpt, "_save_tensors", real)
    root = tmp_path / "checkpoints"
    # the failed write removed its temp folder (a killed process leaves it: the next save replaces it)
    assert not (root / ".tmp-step_000004").exists() and not (root / "step_000004").exists()
    (root / ".tmp-step_000004").mkdir()  # as a SIGKILL mid-write leaves it
    assert ckpt.latest_checkpoint(root).name == "step_000002"
    assert isinstance(drivesim.load(tmp_path), toy.ToyModel)  # the run folder resolves to its latest checkpoint
    res = train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path, progress=False)
    assert res.start_step == 2 and res.step == 4
    assert not (root / ".tmp-step_000004").exists()


# --------------------------------------------------------------------------------------------------------------
# checkpoint bad input: one-line errors naming the file and field
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def exported(tmp_path) -> Path:
    return ckpt.save_model(_toy_model(), tmp_path / "export")


def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_exported_checkpoint_round_trip(exported):
    model = drivesim.load(exported)
    assert type(model) is toy.ToyModel and model.config == toy.ToyConfig()
    ref = _toy_model()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    meta = json.loads((exported / ckpt.CONFIG_NAME).read_text())
    assert meta == {"format_version": 1, "model_class": "engine_toy", "config": to_dict(toy.ToyConfig())}


def test_checkpoint_bad_inputs(exported, tmp_path):
    cfg_path = exported / ckpt.CONFIG_NAME
    weights = exported / ckpt.MODEL_NAME
    _one_line_error(CheckpointError, lambda: ckpt.load_model(exported, expected_class="autoencoder"),
                    str(cfg_path), "model_class", "engine_toy")

    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**meta, "format_version": 99}))
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), str(cfg_path), "format_version", "99")
    cfg_path.write_text(json.dumps({**meta, "model_class": "no_such_model"}))
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), "model_class", "no_such_model")
    cfg_path.write_text(json.dumps({**meta, "config": {**meta["config"], "hiden": 3}}))
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), "hiden", "unknown key")
    cfg_path.write_text(json.dumps(meta))

    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), str(weights), "corrupt safetensors")
    torch.save(_toy_model().state_dict(), weights)  # a pickle payload under a safetensors name
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), str(weights), "pickle")
    weights.write_bytes(good)
    assert isinstance(drivesim.load(exported), toy.ToyModel)

    cfg_path.unlink()
    _one_line_error(CheckpointError, lambda: drivesim.load(exported), str(cfg_path), "missing config.json")


def test_resume_refuses_checkpoint_of_another_model_config(tmp_path):
    train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), tmp_path, progress=False)
    other = _toy_model(hidden=16)
    _one_line_error(CheckpointError, lambda: train(other, toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path,
                                                   progress=False), "config.hidden", "config.json")
    _one_line_error(ConfigError, lambda: train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path,
                                               resume=False, progress=False), "resume=False", "step_000002")
    ema_model = ckpt.load_model(tmp_path / "checkpoints" / "step_000002", ema=True)
    raw_model = ckpt.load_model(tmp_path / "checkpoints" / "step_000002")
    assert not torch.equal(ema_model.net[0].weight, raw_model.net[0].weight)


# --------------------------------------------------------------------------------------------------------------
# configs: YAML round trip, strict keys, CLI
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip(tmp_path, name):
    preset = get_preset(name)
    path = dump_yaml(preset, tmp_path / "p.yaml")
    assert load_yaml(Preset, path) == preset


def test_yaml_unknown_key_and_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("max_steps: 10\nlr: 1e-4\nbetas: [0.9, 0.99]\n")
    assert load_yaml(TrainConfig, path) == TrainConfig(max_steps=10, lr=1e-4, betas=(0.9, 0.99))
    path.write_text("max_steps: 10\nlearning_rate: 1e-4\n")
    _one_line_error(ConfigError, lambda: load_yaml(TrainConfig, path), str(path), "learning_rate", "unknown key")
    path.write_text("max_steps: [\n")
    _one_line_error(ConfigError, lambda: load_yaml(TrainConfig, path), str(path), "invalid YAML")
    preset = get_preset("tiny")
    assert override(preset, "train.image_ldm.lr", "2e-4").train["image_ldm"].lr == 2e-4
    assert override(preset, "image_ldm.unet.channel_mult", "[1, 2, 4]").image_ldm.unet.channel_mult == (1, 2, 4)
    _one_line_error(ConfigError, lambda: override(preset, "image_ldm.unet.chanel_mult", "[1]"),
                    "image_ldm.unet.chanel_mult", "unknown key")
    # YAML 1.1 reads "no" as False: a text field keeps the word (mixed_precision: 'no' | 'bf16' | 'fp16')
    bf16 = override(preset, "train.image_ldm.mixed_precision", "bf16")
    assert override(bf16, "train.image_ldm.mixed_precision", "no").train["image_ldm"].mixed_precision == "no"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from drivesim.cli.main import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_show_cli(capsys, tmp_path):
    code, out, _ = _cli(capsys, "config", "show", "tiny")
    assert code == 0 and "train.prediction.lr = 0.0001" in out and "autoencoder.base_channels = 16" in out
    code, out, _ = _cli(capsys, "config", "show", "cpu-small", "--section", "train.image_ldm", "--yaml")
    assert code == 0 and load_yaml_text(out, tmp_path) == to_dict(get_preset("cpu-small").train["image_ldm"])
    code, _, err = _cli(capsys, "config", "show", "no-such-preset")
    assert code == 1 and "no-such-preset" in err and err.strip().count("\n") == 0
    code, _, err = _cli(capsys, "config", "show", "tiny", "--section", "train.nope")
    assert code == 1 and "train.nope" in err


def load_yaml_text(text: str, tmp_path: Path) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_train_cli_smoke_and_bad_input(capsys, tmp_path, monkeypatch):
    from drivesim.pipeline import stages

    seen = {}

    def build(preset, data_path, width="32"):
        seen["preset"], seen["width"] = preset, width
        return toy.ToyModel(toy.ToyConfig(hidden=int(width))), toy.ToyDataset(16), None

    # a test-only stand-in builder under a real stage name (restored by monkeypatch)
    monkeypatch.setitem(stages.STAGES, "autoencoder", stages.StageSpec("autoencoder", build, options={"width": ""}))
    out = tmp_path / "run"
    args = ["train", "autoencoder", "--preset", "tiny", "--data", str(tmp_path), "--out", str(out), "--no-progress"]
    code, stdout, err = _cli(capsys, *args, "--max-steps", "3", "--batch-size", "4", "--set", "train.lr=5e-3",
                             "--opt", "width=16")
    assert code == 0, err
    assert seen["width"] == "16" and seen["preset"].train["autoencoder"].lr == 5e-3
    assert seen["preset"].train["autoencoder"].batch_size == 4
    assert "trainable" in stdout and "frozen" in stdout
    model = drivesim.load(out / "model")
    assert isinstance(model, toy.ToyModel) and model.config.hidden == 16
    assert isinstance(drivesim.load(out / "model-ema"), toy.ToyModel)
    assert load_yaml(Preset, out / "config-autoencoder.yaml").train["autoencoder"].max_steps == 3

    for extra, needle in [(["--no-resume"], "--no-resume"), (["--set", "train.lrr=1"], "train.autoencoder.lrr"),
                          (["--opt", "depth=2"], "depth"), (["--mixed-precision", "fp8"], "mixed_precision")]:
        code, _, err = _cli(capsys, *args, *extra)
        assert code == 1 and needle in err and err.strip().count("\n") == 0, (extra, err)
    code, _, err = _cli(capsys, "train", "autoencoder", "--preset", "huge", "--data", str(tmp_path), "--out",
                        str(out))
    assert code == 1 and "huge" in err
    monkeypatch.delitem(stages.STAGES, "autoencoder")
    code, _, err = _cli(capsys, *args)
    assert code == 1 and "no training builder registered" in err
    code, _, err = _cli(capsys, "train", "warp_drive", "--preset", "tiny", "--data", str(tmp_path), "--out", str(out))
    assert code == 1 and "unknown stage 'warp_drive'" in err


def test_eta_is_capped_by_the_time_budget():
    from drivesim.training.loop import eta_seconds, format_eta

    assert eta_seconds(100, 2000, 1.0, 60.0, None) == 1900.0  # steps only
    assert eta_seconds(100, 2000, 1.0, 60.0, 180.0) == 120.0  # a 3-minute budget ends it first
    assert eta_seconds(1990, 2000, 1.0, 60.0, 180.0) == 10.0  # the steps end first
    assert eta_seconds(0, 2000, 0.0, 0.0, None) is None
    assert eta_seconds(0, 2000, 0.0, 200.0, 180.0) == 0.0
    assert format_eta(3725.2) == "1:02:05" and format_eta(None) == "-"


def test_safetensors_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    # the u64 header length comes first; a length with low byte 0x80 starts the file like a pickle stream (1 file in
    # 256 of any size: a 542,959-parameter detector export hit it)
    from safetensors.torch import save_file

    from drivesim.training.checkpoint import read_tensors

    path = tmp_path / "model.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_tensors(path)["w"].sum().item() == 2.0


def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    # safetensors reports a full disk as a SafetensorError, which leaked from `drivesim train` as a traceback
    from safetensors import SafetensorError

    train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), tmp_path, progress=False)
    real, calls = ckpt.save_file, {"n": 0}

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the rng file went through; the model weights do not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(WriteError) as err:
        train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=4), tmp_path, progress=False)
    root = tmp_path / "checkpoints"
    assert str(err.value) == (f"{root / '.tmp-step_000004' / 'model.safetensors'}: write: I/O error: No space left "
                              "on device (os error 28); nothing was written")
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
    monkeypatch.setattr(ckpt, "save_file", real)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # the export's first file fails to reach the disk
    with pytest.raises(WriteError, match=r"\.tmp-export/model\.safetensors: write: No space left on device"):
        ckpt.save_model(_toy_model(), tmp_path / "export")
    assert not (tmp_path / ".tmp-export").exists() and not (tmp_path / "export").exists()


def test_rerunning_a_finished_run_keeps_its_exports(tmp_path):
    # re-running a finished `drivesim train autoencoder` re-exported model/ and reset the scale factor that
    # `drivesim encode` had written into it
    out = tmp_path / "run"
    train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), out, progress=False)
    cfg_path = out / "model" / "config.json"
    edited = json.loads(cfg_path.read_text())
    edited["note"] = "written by a later step"
    cfg_path.write_text(json.dumps(edited))
    res = train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), out, progress=False)
    assert res.step == 2 and res.start_step == 2 and res.export_dir == out / "model"
    assert json.loads(cfg_path.read_text())["note"] == "written by a later step"
    # killed between its two exports: the re-run writes the missing EMA export and still keeps model/
    shutil.rmtree(out / "model-ema")
    res = train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2), out, progress=False)
    assert res.ema_export_dir == out / "model-ema" and isinstance(drivesim.load(out / "model-ema"), toy.ToyModel)
    assert json.loads(cfg_path.read_text())["note"] == "written by a later step"


def test_init_from_starts_a_fresh_run_from_exported_weights(tmp_path):
    src = _toy_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)  # weights no seeded initialisation gives
    ckpt.save_model(src, tmp_path / "src", {k: v.half() for k, v in src.state_dict().items()})  # fp16, as shipped
    result = train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=0, init_from=str(tmp_path / "src")),
                   tmp_path / "ft", progress=False)
    got = drivesim.load(result.export_dir).state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v.half().float()), k
    # a resumed run keeps its own weights: init_from only seeds a fresh run
    train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2, init_from=str(tmp_path / "src")),
          tmp_path / "ft2", progress=False)
    step2 = ckpt.load_model(tmp_path / "ft2")
    resumed = train(_toy_model(), toy.ToyDataset(32), _quick_cfg(max_steps=2, init_from=str(tmp_path / "src")),
                    tmp_path / "ft2", progress=False)
    assert resumed.start_step == 2
    assert torch.equal(ckpt.load_model(tmp_path / "ft2").net[0].weight, step2.net[0].weight)
    _one_line_error(CheckpointError, lambda: train(_toy_model(hidden=16), toy.ToyDataset(32),
                                                   _quick_cfg(max_steps=1, init_from=str(tmp_path / "src")),
                                                   tmp_path / "bad", progress=False),
                    "model.safetensors", "shape")


def test_one_host_sync_per_optimizer_step_not_per_micro_batch(tmp_path, monkeypatch):
    # a GPU stalls at every .item() / float(tensor) / bool(tensor): the loop may read the device once per optimizer
    # step (is the step good?), plus on log steps; never once per micro-batch
    import sys as _sys

    from drivesim.training import loop

    calls = []
    for name in ("item", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if _sys._getframe(1).f_code.co_filename == loop.__file__:
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = _quick_cfg(max_steps=6, grad_accum_steps=4, log_every=100, checkpoint_every=100, ema_decay=0.0)
    train(_toy_model(host_rng=False), toy.ToyDataset(64), cfg, tmp_path, progress=False)
    # 6 steps x 1 check + the last step's log (loss, grad norm) + the result's final loss
    assert len(calls) <= 6 + 3, calls
