"""Checkpoints as folders of safetensors + JSON: nothing in a checkpoint is ever unpickled.

Exported inference checkpoint (`save_model` / `load_model`, `drivesim.load`)::

    model/
      config.json          {"format_version", "model_class", "config": to_dict(model.config)}
      model.safetensors    the model's state_dict

Training checkpoint (`save_training_checkpoint` / `load_training_checkpoint`), under `out_dir/checkpoints/`::

    step_000123/
      config.json          as above + "train_config" (to_dict(TrainConfig)) and "step"
      model.safetensors    live weights
      ema.safetensors      full state_dict with the EMA averages in place of the trainable parameters
      optimizer.safetensors / optimizer.json   optimizer tensors ("state.<i>.<name>") / everything else
                           (param_groups with their parameter names, non-tensor state)
      scheduler.json       lr scheduler state_dict (all plain numbers)
      trainer_state.json   step, data position (epoch + samples consumed in the seeded permutation), EMA
                           update count, bad-step counters, process count, grad-scaler state
      rng_rank<r>.safetensors / rng_rank<r>.json   per process: torch CPU/CUDA generator states and the numpy
                           MT19937 key / numpy position + python `random` state
      COMPLETE             written last; a folder without it is ignored

A checkpoint is assembled in `.tmp-step_000123/` and renamed into place only after `COMPLETE` is written, so a
crash at any point leaves the previous `step_*` folder as the latest. `latest_checkpoint` scans the complete
folders; it never trusts a pointer file.

One module because it defines both checkpoint formats (exported and training) and the checks shared by their
readers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from drivesim.atomic import replace_dir
from drivesim.configs import FORMAT_VERSION, ConfigError, from_dict, to_dict
from drivesim.errors import CheckpointError, WriteError
from drivesim.training.sharding import fits, shard_like, shard_optimizer_state

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINTS_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Byte signatures of pickle-based files: a pickle stream (protocol >= 2) starts with 0x80, a `torch.save` zip
# archive with the zip local-file header.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------------------------
# Low-level file I/O
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(data: Any, path: Path) -> None:
    """Raises WriteError naming `path` (full or read-only disk)."""
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError.from_os(path, e) from None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as safetensors; tensors sharing storage (tied weights) are stored as separate copies.

    Raises:
        WriteError: naming `path` (full or read-only disk; safetensors reports it as a SafetensorError).
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
        out[name] = t.contiguous().clone() if key in seen or not t.is_contiguous() else t
        seen.add(key)
    try:
        save_file({k: v.cpu() for k, v in out.items()}, str(path), metadata={"format": "pt"})
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError.from_os(path, e) from None
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while serializing: ")
        raise WriteError(f"{path}: write: {reason}; nothing was written") from None


def read_json(path: Path) -> dict:
    """Read a JSON object.

    Raises:
        CheckpointError: missing file, a pickle payload, or invalid JSON (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    raw = path.read_bytes()
    if raw.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path}: carries a pickle payload; drivesim never unpickles checkpoint files")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file without executing anything from it.

    Raises:
        CheckpointError: missing file, a pickle payload (e.g. a `torch.save` file renamed to .safetensors), or a
            corrupt/truncated safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file starts with its header length (u64, little-endian) and then the JSON header "{...": a length
    # whose low byte is 0x80 makes it start like a pickle stream, so the magic is only checked when no header follows
    if head[8:9] != b"{" and head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path}: carries a pickle payload (torch.save/pickle format), not safetensors; "
                              "drivesim never unpickles checkpoint files")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------------------------


def model_class_name(model: nn.Module) -> str:
    name = getattr(type(model), "model_class_name", None)
    if name is None:
        raise TypeError(f"{type(model).__name__} is not registered with drivesim.registry.register_model")
    return name


def read_header(folder: Path) -> tuple[dict, Path]:
    """Read and validate `folder/config.json` (format_version, model_class, config).

    Raises:
        CheckpointError: missing config.json, a newer format_version, or a missing/ill-typed field.
    """
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (missing)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json")
    meta = read_json(path)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version: missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version: {version} is newer than this drivesim supports "
                              f"({FORMAT_VERSION}); upgrade drivesim")
    if not isinstance(meta.get("model_class"), str):
        raise CheckpointError(f"{path}: model_class: missing or not a string")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: config: missing or not a mapping")
    _migrate(meta)
    return meta, path


def _migrate(meta: dict) -> None:
    """Renamed config fields of checkpoints written by earlier versions (same tensors, same meaning)."""
    config = meta["config"]
    if meta["model_class"] in ("prediction_ldm", "interpolation_ldm") and "stage" in config and "task" not in config:
        config["task"] = config.pop("stage")  # VideoLDMConfig.stage became .task (a training stage is another thing)


def _expected_name(expected: str | type | None) -> str | None:
    if expected is None or isinstance(expected, str):
        return expected
    return getattr(expected, "model_class_name", expected.__name__)


def _check_class(meta: dict, path: Path, expected: str | type | None) -> None:
    want = _expected_name(expected)
    if want is not None and meta["model_class"] != want:
        raise CheckpointError(f"{path}: model_class: checkpoint holds {meta['model_class']!r}, expected {want!r}")


def _first_difference(a: Any, b: Any, prefix: str = "config") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}.{k}"
            diff = _first_difference(a[k], b[k], f"{prefix}.{k}")
            if diff:
                return diff
        return None
    return None if a == b else prefix


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """`model.load_state_dict(state, strict=True)` with one-line errors naming the file and the tensor.

    A model sharded by FSDP2 takes the full tensors too: each process keeps its slice (`sharding.shard_like`; a
    0-dim tensor loads into its lifted `(1,)` parameter).

    Raises:
        CheckpointError: a missing or unexpected tensor, or a shape mismatch.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{source}: {missing[0]}: missing tensor ({len(missing)} missing)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{source}: {unexpected[0]}: unexpected tensor ({len(unexpected)} unexpected)")
    for k, v in own.items():
        if not fits(state[k], v):
            raise CheckpointError(f"{source}: {k}: shape {tuple(state[k].shape)}, model has {tuple(v.shape)}")
    model.load_state_dict({k: shard_like(v, own[k]) for k, v in state.items()}, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Exported inference checkpoints
# ----------------------------------------------------------------------------------------------------------------


def save_model(model: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Export `model` (or `state_dict`, e.g. EMA weights) with its config to the folder `path`, atomically.

    The folder holds `model.safetensors` and `config.json` {"format_version", "model_class", "config"}; an
    existing folder at `path` is replaced only once the new one is complete.

    Raises:
        WriteError: a file cannot be written (full or read-only disk); the temp folder is removed, `path` is
            untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_tensors(state_dict if state_dict is not None else model.state_dict(), tmp / MODEL_NAME)
        _write_json({"format_version": FORMAT_VERSION, "model_class": model_class_name(model),
                     "config": to_dict(model.config)}, tmp / CONFIG_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)
    return path


def load_model(path: str | Path, expected_class: str | type | None = None, *, ema: bool = False,
               device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in an exported (or training) checkpoint folder.

    Args:
        path: a folder with `config.json` + `model.safetensors`; a training run's `out_dir` (its latest complete
            checkpoint is used) is accepted too.
        expected_class: registered name or class the checkpoint must hold; None accepts any registered class.
        ema: load `ema.safetensors` (training checkpoints) instead of `model.safetensors`.
        device: where the weights are placed.

    Returns:
        The model (class from `config.json`'s `model_class` via `drivesim.registry`), in eval mode.

    Raises:
        CheckpointError: missing config.json or weights, newer format_version, another model class, an unknown
            model class, corrupt safetensors, a pickle payload, or tensors that do not fit the config.
    """
    import drivesim.models  # noqa: F401  (every built-in model module registers on import)
    from drivesim.registry import get_model_class

    folder = Path(path)
    if not (folder / CONFIG_NAME).exists() and (folder / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(folder / CHECKPOINTS_DIR)
        if latest is None:
            raise CheckpointError(f"{folder / CHECKPOINTS_DIR}: no complete checkpoint")
        folder = latest
    meta, cfg_path = read_header(folder)
    _check_class(meta, cfg_path, expected_class)
    cls = get_model_class(meta["model_class"], source=str(cfg_path))
    try:
        config = from_dict(cls.config_class, meta["config"], source=f"{cfg_path}: config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = cls(config)
    weights = folder / (EMA_NAME if ema else MODEL_NAME)
    for stray in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"):
        if not weights.exists() and (folder / stray).exists():
            raise CheckpointError(f"{folder / stray}: pickle-based weights are not loaded; convert to "
                                  f"{weights.name}")
    load_state_into(model, read_tensors(weights), weights)
    return model.to(device).eval()


def init_weights(model: nn.Module, path: str | Path) -> Path:
    """Copy the weights of the exported checkpoint at `path` into `model` (fine-tuning from another run).

    Only the class and the tensor names and shapes must agree: config fields that shape no tensor (loss weights,
    dropout, sampling steps) may differ. Half-precision weights (shipped fp16 checkpoints) are cast to the model's
    dtype. Returns the weights file read.

    Raises:
        CheckpointError: no config.json/weights at `path`, another model class, or tensors that do not fit.
    """
    folder = Path(path)
    meta, cfg_path = read_header(folder)
    _check_class(meta, cfg_path, model_class_name(model))
    weights = folder / MODEL_NAME
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in read_tensors(weights).items()}
    load_state_into(model, state, weights)
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------------------------


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete `step_*` folder with the highest step under `root` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return None if best is None else best[1]


def trained_steps(run: str | Path) -> int:
    """Optimizer steps of a training run folder: the step of its newest complete checkpoint (`run/checkpoints`).

    Raises:
        CheckpointError: `run` has no complete checkpoint.
    """
    ckpt = latest_checkpoint(Path(run) / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{run}: no complete checkpoint under checkpoints/ (is it a training run folder?)")
    return int(read_json(ckpt / TRAINER_STATE)["step"])


def _replace_dir(tmp: Path, final: Path) -> None:
    replace_dir(tmp, final)
    _fsync_dir(final.parent)


def _to_json_value(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_to_json_value(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def optimizer_to_files(optimizer: torch.optim.Optimizer, group_names: list[list[str]],
                       state_dict: dict | None = None) -> tuple[dict, dict]:
    """Split `state_dict` (default `optimizer.state_dict()`) into (tensors for safetensors, JSON-able rest)."""
    sd = optimizer.state_dict() if state_dict is None else state_dict
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                plain_state.setdefault(str(idx), {})[k] = v
    groups = [{k: _to_json_value(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "param_names": group_names, "state": plain_state}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, group_names: list[list[str]],
                         source: Path) -> dict:
    """Inverse of `optimizer_to_files`; checks that the parameter groups hold the same parameters.

    Raises:
        CheckpointError: the saved groups name other parameters than the model being trained.
    """
    saved = meta.get("param_names")
    if saved != group_names:
        if not isinstance(saved, list) or len(saved) != len(group_names):
            raise CheckpointError(f"{source}: param_names: {len(saved or [])} parameter groups saved, "
                                  f"the model has {len(group_names)}")
        for gi, (a, b) in enumerate(zip(saved, group_names, strict=True)):
            if a != b:
                diff = sorted(set(a) ^ set(b)) or ["(order)"]
                raise CheckpointError(f"{source}: param_names[{gi}]: differs from the model's trainable "
                                      f"parameters at {diff[0]}")
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for idx, entry in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def _rng_files(rank: int) -> tuple[str, str]:
    return f"rng_rank{rank}.safetensors", f"rng_rank{rank}.json"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: (tensors, JSON) for torch CPU/CUDA, numpy and python `random`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_training_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    scheduler: Any,
    train_config: Any,
    trainer_state: dict,
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    keep: int = 0,
    optimizer_state: dict | None = None,
) -> Path:
    """Write `root/step_<step>/` atomically; every process must call it (each writes its RNG state).

    Args:
        model_state / ema_state: full state dicts (gathered by the caller under FSDP).
        optimizer_state: the optimizer's state_dict with full tensors (gathered by the caller under FSDP; None:
            `optimizer.state_dict()`). Only the main process's values are used.
        keep: keep only the newest `keep` complete checkpoints (0 keeps all).

    Returns:
        The final checkpoint folder.

    Raises:
        WriteError: a file cannot be written (full or read-only disk); the main process removes the temp folder,
            so the previous checkpoint stays the latest and nothing half-written is left (a process killed
            mid-write leaves it, and the next save at that step replaces it).
    """
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        rng_tensors, rng_meta = capture_rng()
        rng_st, rng_js = _rng_files(rank)
        _save_tensors(rng_tensors, tmp / rng_st)
        _write_json(rng_meta, tmp / rng_js)
        if is_main:
            _save_tensors(model_state, tmp / MODEL_NAME)
            if ema_state is not None:
                _save_tensors(ema_state, tmp / EMA_NAME)
            opt_tensors, opt_meta = optimizer_to_files(optimizer, group_names, optimizer_state)
            _save_tensors(opt_tensors, tmp / OPTIMIZER_TENSORS)
            _write_json(opt_meta, tmp / OPTIMIZER_JSON)
            _write_json(scheduler.state_dict(), tmp / SCHEDULER_JSON)
            _write_json(trainer_state, tmp / TRAINER_STATE)
            _write_json({"format_version": FORMAT_VERSION, "model_class": model_class_name(model),
                         "config": to_dict(model.config), "train_config": to_dict(train_config), "step": step},
                        tmp / CONFIG_NAME)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_main:
        (tmp / COMPLETE_MARKER).write_text("complete\n")
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        if keep > 0:
            complete = sorted((int(m.group(1)), c) for c in root.iterdir()
                              if (m := _STEP_RE.match(c.name)) and (c / COMPLETE_MARKER).is_file())
            for _, old in complete[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    scheduler: Any,
    ema: Any,
    rank: int,
) -> tuple[dict, bool]:
    """Restore model, EMA, optimizer, scheduler and this process's RNG from `folder`.

    Returns:
        (trainer_state dict, whether this rank's RNG state was found).

    Raises:
        CheckpointError: any missing/corrupt file, newer format_version, another model class, or a model config
            that differs from the checkpoint's (the message names the first differing field).
    """
    folder = Path(folder)
    meta, cfg_path = read_header(folder)
    _check_class(meta, cfg_path, model_class_name(model))
    diff = _first_difference(meta["config"], to_dict(model.config))
    if diff:
        raise CheckpointError(f"{cfg_path}: {diff}: checkpoint's model config differs from the model being trained")
    load_state_into(model, read_tensors(folder / MODEL_NAME), folder / MODEL_NAME)
    if ema is not None:
        # a run saved without EMA (ema_decay 0) restarts the average from the restored weights, not from init
        ema_state = read_tensors(folder / EMA_NAME) if (folder / EMA_NAME).exists() else model.state_dict()
        ema.load_shadow(ema_state, str(folder / EMA_NAME))
    opt_state = optimizer_from_files(read_tensors(folder / OPTIMIZER_TENSORS), read_json(folder / OPTIMIZER_JSON),
                                     group_names, folder / OPTIMIZER_JSON)
    optimizer.load_state_dict(shard_optimizer_state(opt_state, optimizer))
    scheduler.load_state_dict(read_json(folder / SCHEDULER_JSON))
    trainer_state = read_json(folder / TRAINER_STATE)
    rng_st, rng_js = _rng_files(rank)
    if (folder / rng_st).exists():
        trainer_state["_rng"] = (read_tensors(folder / rng_st), read_json(folder / rng_js))
        return trainer_state, True
    return trainer_state, False
