"""Training one stage of the stack: preset resolution, the stage's builder, the shared loop.

`train_stage` is what `drivesim train STAGE` and the demo call: it seeds, builds the model and dataset through the
stage registry (`drivesim.pipeline.stages`), records the resolved preset next to the checkpoints and runs
`drivesim.training.loop.train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

from drivesim.configs import Preset, TrainConfig, dump_yaml, get_preset, load_yaml, override
from drivesim.errors import ConfigError
from drivesim.pipeline.outputs import undo_unless_resumable
from drivesim.pipeline.stages import get_stage, parse_opts


def resolve_preset(stage: str, preset: str | None, config: Path | None, sets: list[str]) -> Preset:
    """Preset from a preset name or a preset YAML, then the `key=value` overrides in `sets`.

    `train.X=V` is shorthand for `train.<stage>.X=V`; other keys are dotted paths into the preset, e.g.
    `autoencoder.kl_weight=1e-6`, `prediction.unet.dropout=0.1`.

    Raises:
        ConfigError: unknown stage, neither/both of `preset` and `config`, unknown preset, bad YAML, unknown key.
    """
    get_stage(stage)
    if (preset is None) == (config is None):
        raise ConfigError("train: give exactly one of --preset NAME or --config FILE.yaml")
    cfg = get_preset(preset) if preset is not None else load_yaml(Preset, config)
    if stage not in cfg.train:
        raise ConfigError(f"{config or 'preset ' + str(preset)}: train.{stage}: no training config for this stage")
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: {item!r}: expected key=value")
        parts = key.split(".")
        if parts[0] == "train" and len(parts) == 2:
            key = f"train.{stage}.{parts[1]}"
        cfg = override(cfg, key, raw)
    return cfg


def with_train_overrides(preset: Preset, stage: str, **fields: Any) -> Preset:
    """`preset` with `train.<stage>` fields replaced (None values are ignored), validated.

    Raises:
        ConfigError: the resulting training config is invalid (names the field).
    """
    from drivesim.training.loop import validate_train_config

    tc: TrainConfig = dataclasses.replace(preset.train[stage], **{k: v for k, v in fields.items() if v is not None})
    validate_train_config(tc)
    return dataclasses.replace(preset, train={**preset.train, stage: tc})


def train_stage(stage: str, preset: Preset, data: Path, out: Path, *, opts: dict[str, str] | list[str] | None = None,
                resume: bool = True, progress: bool = True, **train_kwargs: Any):
    """Train `stage` of the stack with `preset` (its model block and `preset.train[stage]`) on `data`.

    Args:
        stage: one of `drivesim.pipeline.stages.STAGE_NAMES`.
        preset: the fully resolved preset (`resolve_preset`, `with_train_overrides`).
        data: a clip-format dataset folder or a latent cache (.h5), as the stage needs.
        out: run folder (checkpoints/, logs/, model/, model-ema/, config-<stage>.yaml).
        opts: the stage's options (`--opt key=value` strings or a dict), checked against the stage's list.
        resume: continue from the newest checkpoint in `out` (False refuses a folder holding checkpoints).
        train_kwargs: passed on to `drivesim.training.loop.train`.

    Returns:
        `drivesim.training.loop.TrainResult`.

    Raises:
        ConfigError: unknown stage or option, missing data, `resume=False` on a folder with checkpoints, an
            invalid training config, a resume that changes the optimisation without `allow_config_change=True`
            (`drivesim.training.history`); DataError / CheckpointError from the stage's builder and the loop.
            Whatever fails before the first checkpoint is written (Ctrl-C and SIGTERM too) leaves `out` as it was
            (`drivesim.pipeline.outputs.undo_unless_resumable`): nothing there a resume could use.
    """
    import torch

    from drivesim.training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
    from drivesim.training.history import HISTORY_NAME, check_resume_config
    from drivesim.training.loop import train, validate_train_config

    spec = get_stage(stage)
    tc = preset.train[stage]
    validate_train_config(tc)
    stage_opts = parse_opts(spec, [f"{k}={v}" for k, v in opts.items()] if isinstance(opts, dict) else opts or [])
    data, out = Path(data), Path(out)
    if not data.exists():
        raise ConfigError(f"{data}: --data: no such file or folder")
    latest = latest_checkpoint(out / CHECKPOINTS_DIR)
    if not resume and latest is not None:
        raise ConfigError(f"{out}: --no-resume: folder already holds checkpoints; resume or choose another --out")
    if latest is not None:  # before config-<stage>.yaml is rewritten: a refused resume leaves the run as it was
        check_resume_config(latest, tc, train_kwargs.get("allow_config_change", False))
    if tc.init_from is not None and not (Path(tc.init_from) / "config.json").is_file():
        raise ConfigError(f"{tc.init_from}: --init-from: no exported checkpoint here (config.json missing)")

    main_process = int(os.environ.get("RANK", "0")) == 0
    # a run that fails before its first checkpoint (bad data, a full disk, SIGTERM) has nothing to resume from: its
    # config-<stage>.yaml, history.jsonl, empty checkpoints/ and logs/ would only mislead, so they go (a folder
    # that was there keeps what it held, its records their earlier bytes); once a checkpoint exists all stays
    records = (f"config-{stage}.yaml", HISTORY_NAME)
    undo = (undo_unless_resumable(out, lambda: latest_checkpoint(out / CHECKPOINTS_DIR) is not None, records)
            if main_process else contextlib.nullcontext())
    with undo:
        torch.manual_seed(tc.seed)
        model, dataset, collate_fn = spec.build(preset, data, **stage_opts)
        if main_process:
            dump_yaml(preset, out / f"config-{stage}.yaml")
        return train(model, dataset, tc, out, collate_fn=collate_fn, resume=resume, progress=progress,
                     **train_kwargs)
