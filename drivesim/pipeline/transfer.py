"""Temporal layers carried to another image backbone (`drivesim stack transfer`; Video LDM, Blattmann et al. 2023,
section 4.3: temporal layers trained on one image LDM work on a fine-tuned one, there DreamBooth).

A video model here is the image LDM's spatial U-Net plus parameters the image LDM does not have (`VideoUNet`): the
temporal layers, their `AlphaBlender` mix factors, LVDM's context-mask convolution and, for interpolation, the stage
embedding. `transfer_temporal` builds a video model of the donor's class (prediction or interpolation) whose

- spatial part (every tensor the image LDM has, under `unet.spatial.`) is the backbone image LDM's, and
- temporal part (every other tensor of the video model) is the donor video model's,

each copied unchanged, and exports it like any trained model (safetensors + config.json with format_version), so
`drivesim.load`, `drivesim rollout` (as D/prediction or D/interpolation beside the backbone as D/image_ldm) and
`--opt`/`--init-from` take it. `model_card.json` beside it records where each part came from (path, resolved
checkpoint folder and sha256 of its weights file).

The result's config is the donor's (task, temporal layers, frames, strides, context settings, sampling, data_fps)
with the backbone's `unet` block and `encoder_id`: the spatial layers and the latent space are the backbone's.

Refused, with one line naming the first difference: a donor that is not a prediction/interpolation model, a backbone
that is not an image LDM, a backbone U-Net config that differs from the donor's in a field that shapes a tensor or
the forward pass (`TRAINING_ONLY_UNET_FIELDS` may differ; the result takes the backbone's), another noise schedule
or parameterisation, and, unless `allow_other_latents`, a backbone trained on another autoencoder's latents.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from drivesim.errors import CheckpointError

__all__ = ["TRAINING_ONLY_UNET_FIELDS", "VIDEO_CLASSES", "combine", "split_keys", "transfer_temporal"]

VIDEO_CLASSES = ("prediction_ldm", "interpolation_ldm")
"""Model classes whose temporal layers can be carried over (the upsampler's U-Net is not an image LDM's)."""

TRAINING_ONLY_UNET_FIELDS = ("dropout", "drop_night_p", "drop_crowdedness_p", "drop_all_p", "gradient_checkpointing")
"""`UNetConfig` fields that shape no tensor and do not change the forward pass in eval mode (dropout rates, label
drop probabilities of classifier-free guidance training, activation checkpointing): a backbone fine-tuned with other
values is accepted and the result keeps the backbone's."""

SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
"""`DiffusionConfig` fields the spatial network's output depends on (what it was trained to predict, at which
noise levels); sampler settings may differ and the result keeps the donor's."""

CARD_NAME = "model_card.json"
SPATIAL_PREFIX = "unet.spatial."
"""Where a video model keeps the image LDM's U-Net: image key `unet.X` is video key `unet.spatial.X`."""


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """(dotted field, a's value, b's value) of the first difference of two `to_dict` trees, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
            diff = _first_difference(a[k], b[k], f"{path}.{k}")
            if diff:
                return diff
        return None
    return None if a == b else (path, a, b)


def split_keys(video: nn.Module, image: nn.Module,
               source: str = "--backbone") -> tuple[frozenset[str], frozenset[str]]:
    """Partition the video model's state_dict keys into (spatial, temporal).

    Spatial: the image LDM's keys `unet.X` as `unet.spatial.X` (parameters and persistent buffers alike); temporal:
    every other key of the video model (temporal layers, alpha mix factors, context-mask conv, stage embedding).

    Args:
        video: a `PredictionLDM` / `InterpolationLDM`.
        image: an `ImageLDM` of the same U-Net architecture.
        source: how errors name the image LDM.
    Raises:
        CheckpointError: an image tensor the video model lacks or holds in another shape (names the tensor).
        RuntimeError: the spatial keys disagree with `VideoUNet.spatial_parameter_names` (the set it freezes): a
            programming error in the video U-Net, not a user input.
    """
    own = video.state_dict()
    spatial = set()
    for key, value in image.state_dict().items():
        mapped = SPATIAL_PREFIX + key.removeprefix("unet.")
        if not key.startswith("unet.") or mapped not in own:
            raise CheckpointError(f"{source}: {key}: the image LDM has this tensor, the video model has no "
                                  f"{mapped}")
        if own[mapped].shape != value.shape:
            raise CheckpointError(f"{source}: {key}: shape {tuple(value.shape)}, the donor's {mapped} has "
                                  f"{tuple(own[mapped].shape)}")
        spatial.add(mapped)
    frozen = {f"unet.{n}" for n in video.unet.spatial_parameter_names}
    params = {n for n, _ in video.named_parameters()}
    if frozen != spatial & params:
        odd = sorted(frozen ^ (spatial & params))
        raise RuntimeError(f"spatial keys disagree with VideoUNet.spatial_parameter_names at {odd[:3]}")
    return frozenset(spatial), frozenset(own.keys() - spatial)


def combine(donor: nn.Module, backbone: nn.Module, allow_other_latents: bool = False,
            names: tuple[str, str] = ("--temporal", "--backbone")) -> nn.Module:
    """The donor's temporal part on the backbone's spatial part (see the module docstring).

    Args:
        donor: a trained `PredictionLDM` or `InterpolationLDM`.
        backbone: an `ImageLDM`.
        allow_other_latents: accept a backbone whose recorded `encoder_id` differs from the donor's.
        names: how errors name the donor and the backbone (e.g. "runs/pred: --temporal").
    Returns:
        A new model of the donor's class, on the CPU, in eval mode; its config is the donor's with the backbone's
        `unet` and `encoder_id`. Neither input is modified.
    Raises:
        CheckpointError: another class than expected, a U-Net or schedule field that differs (named, with both
            values), another latent space without `allow_other_latents`, or a tensor that does not fit (named).
    """
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.models.video_ldm import VideoLDM
    from drivesim.training.checkpoint import load_state_into, model_class_name

    dname, bname = names
    if not isinstance(donor, VideoLDM):
        raise CheckpointError(f"{dname}: model_class: {model_class_name(donor)!r} is not a prediction or "
                              f"interpolation model (the temporal layers come from a {' or '.join(VIDEO_CLASSES)} "
                              "checkpoint)")
    if not isinstance(backbone, ImageLDM):
        raise CheckpointError(f"{bname}: model_class: {model_class_name(backbone)!r} is not an image LDM (the "
                              "spatial layers come from an image_ldm checkpoint)")
    dcfg, bcfg = donor.config, backbone.config
    skip = set(TRAINING_ONLY_UNET_FIELDS)
    d_unet = {k: v for k, v in dataclasses.asdict(dcfg.unet).items() if k not in skip}
    b_unet = {k: v for k, v in dataclasses.asdict(bcfg.unet).items() if k not in skip}
    diff = _first_difference(d_unet, b_unet, "unet")
    if diff:
        raise CheckpointError(f"{bname}: {diff[0]}: {diff[2]!r}, the donor's spatial U-Net has {diff[1]!r} (the "
                              "temporal layers only fit the architecture they were trained in)")
    for name in SCHEDULE_FIELDS:
        if getattr(dcfg.diffusion, name) != getattr(bcfg.diffusion, name):
            raise CheckpointError(f"{bname}: diffusion.{name}: {getattr(bcfg.diffusion, name)!r}, the donor has "
                                  f"{getattr(dcfg.diffusion, name)!r}")
    if (dcfg.encoder_id is not None and bcfg.encoder_id is not None and dcfg.encoder_id != bcfg.encoder_id
            and not allow_other_latents):
        raise CheckpointError(f"{bname}: encoder_id: trained on latents of another autoencoder than the donor "
                              f"({bcfg.encoder_id[:12]}... vs {dcfg.encoder_id[:12]}...); --allow-other-latents "
                              "carries the layers over anyway")
    config = dataclasses.replace(dcfg, unet=bcfg.unet, encoder_id=bcfg.encoder_id)
    result = type(donor)(config)
    spatial, temporal = split_keys(result, backbone, bname)
    donor_state, image_state = donor.state_dict(), backbone.state_dict()
    if set(donor_state) != set(result.state_dict()):
        odd = sorted(set(donor_state) ^ set(result.state_dict()))[0]
        raise CheckpointError(f"{dname}: {odd}: {'unexpected' if odd in donor_state else 'missing'} tensor "
                              "(the donor does not have the layout of its own config)")
    state = {k: donor_state[k] for k in temporal}
    state.update({SPATIAL_PREFIX + k.removeprefix("unet."): v for k, v in image_state.items()})
    load_state_into(result, {k: v.detach().cpu() for k, v in state.items()}, f"{dname} + {bname}")
    return result.eval()


def _resolve(path: Path) -> Path:
    """The checkpoint folder a loader reads for `path`: itself when it holds config.json, else the latest complete
    checkpoint of the training run `path` (as `load_model`)."""
    from drivesim.training.checkpoint import CHECKPOINTS_DIR, CONFIG_NAME, latest_checkpoint

    if (path / CONFIG_NAME).is_file() or not (path / CHECKPOINTS_DIR).is_dir():
        return path
    latest = latest_checkpoint(path / CHECKPOINTS_DIR)
    if latest is None:
        raise CheckpointError(f"{path / CHECKPOINTS_DIR}: no complete checkpoint")
    return latest


def _check_class(folder: Path, flag: str, accepted: tuple[str, ...], what: str) -> str:
    from drivesim.training.checkpoint import read_header

    meta, path = read_header(folder)
    if meta["model_class"] not in accepted:
        raise CheckpointError(f"{path}: {flag}: model_class: {meta['model_class']!r} is not {what} "
                              f"({' or '.join(accepted)})")
    return meta["model_class"]


def transfer_temporal(temporal: str | Path, backbone: str | Path, out: str | Path, *,
                      allow_other_latents: bool = False, overwrite: bool = False, command: str | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Build and export the donor's temporal layers on the backbone's spatial layers (`combine`).

    Args:
        temporal: the donor: exported prediction/interpolation folder or a training run (its latest checkpoint's
            live weights, as every loader reads a run folder).
        backbone: the image LDM: exported folder or a training run (same rule).
        out: the exported model folder to write (atomically, with `model_card.json`).
        allow_other_latents: accept donor and backbone trained on different autoencoders' latents.
        overwrite: replace an existing `out` (never an input).
        command: the command line, recorded in the card.
        log: where notes go (an unrecorded latent space, a donor that trained its spatial layers too).
    Returns:
        The model card written: {"command", "model_class", "temporal_from", "spatial_from", "config", "latents",
        "tensors"}; the "*_from" entries hold "path" (as given), "checkpoint" (folder read), "sha256" (of its
        model.safetensors) and "model_class".
    Raises:
        ConfigError: `out` is an input or exists without `overwrite`.
        CheckpointError: see `combine`, and unreadable checkpoints. Nothing is written then.
        WriteError: the folder cannot be written (nothing is left behind).
    """
    from drivesim import __version__
    from drivesim.atomic import replace_dir, write_json_atomic
    from drivesim.eval.weights import sha256_file
    from drivesim.pipeline.outputs import check_output
    from drivesim.training.checkpoint import MODEL_NAME, load_model, save_model

    temporal, backbone, out = Path(temporal), Path(backbone), Path(out)
    check_output(out, {"--temporal": temporal, "--backbone": backbone}, overwrite)
    sources = {}
    for flag, path, accepted, what in (("--temporal", temporal, VIDEO_CLASSES, "a prediction or interpolation model"),
                                       ("--backbone", backbone, ("image_ldm",), "an image LDM")):
        folder = _resolve(path)
        cls = _check_class(folder, flag, accepted, what)
        sources[flag] = {"path": str(path), "checkpoint": str(folder), "sha256": sha256_file(folder / MODEL_NAME),
                         "model_class": cls}
    donor = load_model(Path(sources["--temporal"]["checkpoint"]))
    image = load_model(Path(sources["--backbone"]["checkpoint"]))
    model = combine(donor, image, allow_other_latents, (f"{temporal}: --temporal", f"{backbone}: --backbone"))
    spatial, temporal_keys = split_keys(model, image)

    d_id, b_id = donor.config.encoder_id, image.config.encoder_id
    if d_id is None or b_id is None:
        latents = "unverified"
        log(f"note: encoder_id: {'the donor' if d_id is None else 'the backbone'} does not record the autoencoder "
            "whose latents trained it; make sure both were trained on the same one")
    elif d_id == b_id:
        latents = "same"
    else:
        latents = "different (--allow-other-latents)"
        log("note: encoder_id: donor and backbone were trained on different autoencoders' latents; the result "
            "takes the backbone's (check its videos before trusting them)")
    if donor.config.temporal.train_spatial:
        log("note: temporal.train_spatial: the donor trained its spatial layers too, so its temporal layers were "
            "learned against those, not against the image LDM it started from")
    card = {
        "command": command or f"drivesim stack transfer --temporal {temporal} --backbone {backbone} --out {out}",
        "made_by": f"drivesim {__version__} stack transfer (Video LDM sec. 4.3: temporal layers on another image "
                   "backbone)",
        "model_class": sources["--temporal"]["model_class"],
        "temporal_from": sources["--temporal"],
        "spatial_from": sources["--backbone"],
        "config": "the donor's (task, temporal, diffusion, frames, strides, context, data_fps) with the backbone's "
                  "unet block and encoder_id",
        "latents": latents,
        "encoder_id": {"donor": d_id, "backbone": b_id, "result": b_id},
        "tensors": {"spatial": len(spatial), "temporal": len(temporal_keys),
                    "spatial_prefix": SPATIAL_PREFIX, "dtype": "float32"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-transfer-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp)
        write_json_atomic(tmp / CARD_NAME, card)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card
