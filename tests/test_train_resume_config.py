"""Resume with a changed training config: refused when it alters the optimisation, unless allowed; every start and
resume recorded in the run's history."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from drivesim.configs import TrainConfig, to_dict
from drivesim.errors import ConfigError
from drivesim.training import checkpoint as ckpt
from drivesim.training.history import OPTIMISATION_FIELDS, check_resume_config, read_history
from drivesim.training.loop import train

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


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=2, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=1, ema_decay=0.9,
                tracker=None, seed=3, keep_checkpoints=0)
    return TrainConfig(**{**base, **kw})


def _run(out: Path, **kw):
    torch.manual_seed(0)
    allow = kw.pop("allow_config_change", False)
    return train(toy.ToyModel(toy.ToyConfig()), toy.ToyDataset(32), _cfg(**kw), out, progress=False,
                 allow_config_change=allow)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_changed_lr_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    out = tmp_path / "run"
    _run(out)
    before = _tree(out)
    with pytest.raises(ConfigError) as err:
        _run(out, max_steps=4, lr=6e-4)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{out / 'checkpoints' / 'step_000002' / 'config.json'}: train.lr: changed from 0.003 to "
                          "0.0006 since this checkpoint;"), msg
    assert "--allow-config-change" in msg
    assert _tree(out) == before  # checkpoints, exports and history untouched
    assert [r["event"] for r in read_history(out)] == ["start"]


def test_allowed_change_continues_with_the_new_lr_and_keeps_both_configs(tmp_path):
    out = tmp_path / "run"
    _run(out)
    result = _run(out, max_steps=4, lr=6e-4, allow_config_change=True)
    assert (result.start_step, result.step) == (2, 4)
    history = read_history(out)
    assert [(r["event"], r["step"], r["checkpoint"]) for r in history] == [("start", 0, None),
                                                                           ("resume", 2, "step_000002")]
    assert history[0]["train_config"] == to_dict(_cfg())
    assert history[1]["train_config"] == to_dict(_cfg(max_steps=4, lr=6e-4))
    assert history[1]["changed"] == {"max_steps": [2, 4], "lr": [3e-3, 6e-4]}
    assert all(r["time"].endswith("+00:00") for r in history)
    # the new lr is the one in use (loading the checkpoint had restored the old one): warm-up is over, so the
    # constant schedule's lr is the base rate
    last = out / "checkpoints" / "step_000004"
    groups = json.loads((last / ckpt.OPTIMIZER_JSON).read_text())["param_groups"]
    assert [(g["lr"], g["initial_lr"]) for g in groups] == [(6e-4, 6e-4)]
    sched = json.loads((last / ckpt.SCHEDULER_JSON).read_text())
    assert sched["base_lrs"] == [6e-4] and sched["_last_lr"] == [6e-4] and sched["last_epoch"] == 4
    # and the Adam moments were continued, not reset: the step count runs on from the checkpoint
    state = ckpt.read_tensors(last / ckpt.OPTIMIZER_TENSORS)
    assert float(state["state.0.step"]) == 4.0
    # the next resume compares with the config the run continued with
    assert _run(out, max_steps=4, lr=6e-4).start_step == 4


def test_fields_that_do_not_alter_the_optimisation_may_change(tmp_path):
    out = tmp_path / "run"
    _run(out)
    free = dict(max_steps=3, max_minutes=30.0, checkpoint_every=5, log_every=7, keep_checkpoints=2, num_workers=0,
                max_bad_steps=4, init_from=str(tmp_path / "elsewhere"))
    assert _run(out, **free).step == 3
    changed = read_history(out)[-1]["changed"]
    assert set(changed) == {"max_steps", "max_minutes", "checkpoint_every", "log_every", "keep_checkpoints",
                            "max_bad_steps", "init_from"}


def test_max_steps_is_part_of_a_cosine_schedule(tmp_path):
    out = tmp_path / "run"
    _run(out, lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"train\.max_steps: changed from 2 to 6 since this checkpoint \(the "
                                          r"length of the cosine schedule\)"):
        _run(out, lr_schedule="cosine", max_steps=6)
    # allowed: the cosine decays over the new length from the restored position
    _run(out, lr_schedule="cosine", max_steps=6, allow_config_change=True)
    sched = json.loads((out / "checkpoints" / "step_000006" / ckpt.SCHEDULER_JSON).read_text())
    assert sched["_last_lr"] == [pytest.approx(0.0, abs=1e-12)]  # the end of the 6-step cosine


CHANGES = {"lr": 1e-3, "betas": (0.8, 0.99), "weight_decay": 0.1, "batch_size": 2, "grad_accum_steps": 2,
           "warmup_steps": 5, "lr_schedule": "cosine", "grad_clip": 0.5, "mixed_precision": "bf16",
           "ema_decay": 0.5, "seed": 4}


def test_every_optimisation_field_is_guarded(tmp_path):
    assert set(CHANGES) == set(OPTIMISATION_FIELDS)
    folder = tmp_path / "step_000002"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"train_config": to_dict(_cfg())}))
    for field, value in CHANGES.items():
        new = dataclasses.replace(_cfg(), **{field: value})
        with pytest.raises(ConfigError, match=rf"config\.json: train\.{field}: changed from .* to "
                                              + re.escape(json.dumps(to_dict(value)))):
            check_resume_config(folder, new)
        assert field in check_resume_config(folder, new, allow_change=True)
    assert check_resume_config(folder, _cfg()) == {}


def test_checkpoint_from_before_a_field_existed_counts_it_as_default(tmp_path):
    folder = tmp_path / "step_000002"
    folder.mkdir()
    stored = {k: v for k, v in to_dict(_cfg()).items() if k != "init_from"}
    (folder / "config.json").write_text(json.dumps({"train_config": stored}))
    assert check_resume_config(folder, _cfg()) == {}


def test_cli_refuses_a_changed_lr_on_resume_unless_allowed(tmp_path, monkeypatch, capsys):
    from drivesim.cli.main import main

    from drivesim.pipeline import stages

    build = lambda preset, data_path: (toy.ToyModel(toy.ToyConfig()), toy.ToyDataset(16), None)  # noqa: E731
    monkeypatch.setitem(stages.STAGES, "autoencoder", stages.StageSpec("autoencoder", build, options={}))
    out = tmp_path / "run"
    args = ["train", "autoencoder", "--preset", "tiny", "--data", str(tmp_path), "--out", str(out), "--no-progress"]
    assert main([*args, "--max-steps", "2"]) == 0
    before = _tree(out)
    capsys.readouterr()
    assert main([*args, "--max-steps", "4", "--set", "train.lr=5e-5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert re.search(r"^error: \S+step_000002/config\.json: train\.lr: changed from 0\.0001 to 5e-05 since this "
                     r"checkpoint; .*--allow-config-change", err), err
    assert _tree(out) == before  # checkpoints, history and config-autoencoder.yaml as they were
    assert main([*args, "--max-steps", "4", "--set", "train.lr=5e-5", "--allow-config-change"]) == 0
    history = read_history(out)
    assert [(r["event"], r["train_config"]["lr"]) for r in history] == [("start", 1e-4), ("resume", 5e-5)]
    assert history[1]["changed"]["lr"] == [1e-4, 5e-5]
