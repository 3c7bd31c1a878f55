"""The checkpoint stack a rollout runs: loading D/{autoencoder,image_ldm,prediction,interpolation[,upsampler]} (or,
on LVDM's 3D-autoencoder latents, D/{autoencoder,prediction[,upsampler]}), the encoder identity check, the frame rate
the stack was trained at, and a randomly initialised stack for tests."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from drivesim.errors import CheckpointError, ConfigError
from drivesim.rollout.config import MODEL_DIRS, RolloutConfig

LATENT_3D_ABSENT = ("image_ldm", "interpolation")
"""Stack members a stack on 3D-autoencoder latents does not have (`RolloutModels`)."""


@dataclass
class RolloutModels:
    """The models of a rollout (all in eval mode) and where they came from.

    On 3D-autoencoder latents (`frames_per_latent` > 1: LVDM's `video_autoencoder_3d`) `image_ldm` and
    `interpolation` are None: the prediction model starts unconditionally and one latent frame already stands for
    `frames_per_latent` video frames (LVDM, He et al. 2022 Sec. 3).
    """

    autoencoder: nn.Module
    image_ldm: nn.Module | None
    prediction: nn.Module
    interpolation: nn.Module | None
    upsampler: nn.Module | None = None
    fingerprint: str = ""  # sha256 over the checkpoints' config.json + weights size (resume refuses others)

    @property
    def frames_per_latent(self) -> int:
        """Video frames one latent frame of the stack's autoencoder stands for (1: kl-f8, 4: LVDM's 3D one)."""
        return int(getattr(self.autoencoder, "frames_per_latent", 1))


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes() if name.endswith(".json") else str(f.stat().st_size).encode())
    return h.hexdigest()


def _check_encoder(models: dict[str, nn.Module], name: str, folder: Path) -> None:
    """Refuse a latent model trained on another autoencoder's latents than the stack's autoencoder produces."""
    recorded = getattr(models[name].config, "encoder_id", None) if name != "autoencoder" else None
    if recorded is None or "autoencoder" not in models:
        return
    from drivesim.autoencoder.model import encoder_id

    ae_id = encoder_id(*models["autoencoder"].encoder_fingerprint())
    if recorded != ae_id:
        raise CheckpointError(f"{folder}: encoder_id: {name} was trained on latents of another autoencoder than "
                              f"{folder.parent / 'autoencoder'} ({recorded[:12]}... vs {ae_id[:12]}...)")


def load_models(ckpt_dir: str | Path, upsample: bool = False, device: str | torch.device = "cpu") -> RolloutModels:
    """Load D/autoencoder, D/image_ldm, D/prediction, D/interpolation (+ D/upsampler when `upsample`); when
    D/autoencoder is LVDM's 3D autoencoder (`video_autoencoder_3d`), D/autoencoder and D/prediction only (+
    D/upsampler): the stack of LVDM's base model (`RolloutModels`).

    Raises:
        CheckpointError: a folder is missing or holds another model class, or a latent model was trained on
            another autoencoder's latents (its recorded `encoder_id`) (message names the folder).
    """
    from drivesim.training.checkpoint import load_model

    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint dir: folder not found")
    names = [n for n in MODEL_DIRS if n != "upsampler" or upsample]
    models: dict[str, nn.Module | None] = {}
    h = hashlib.sha256()
    for name in names:
        if name in LATENT_3D_ABSENT and getattr(models["autoencoder"], "frames_per_latent", 1) > 1:
            models[name] = None  # 3D latents: no image LDM, no interpolation (see RolloutModels)
            continue
        folder = root / name
        if not folder.is_dir():
            hint = " (needed by --upsample)" if name == "upsampler" else ""
            raise CheckpointError(f"{folder}: {name}: checkpoint folder not found{hint}; the layout is "
                                  f"{root}/{{{','.join(MODEL_DIRS)}}}")
        model = None
        for cls in MODEL_DIRS[name]:
            try:
                model = load_model(folder, cls, device=device)
                break
            except CheckpointError as e:
                if "model_class" not in str(e) or cls == MODEL_DIRS[name][-1]:
                    raise
        models[name] = model
        real = checkpoint_folder(folder)
        _check_encoder(models, name, folder)
        h.update(name.encode())
        h.update(_fingerprint(real).encode())
    return RolloutModels(fingerprint=h.hexdigest(), **models)


def checkpoint_folder(folder: str | Path) -> Path:
    """The folder holding the weights a stack member loads from: `folder` itself for an exported model (it has a
    config.json), else the latest complete checkpoint of the training run `folder` (else `folder`)."""
    from drivesim.training.checkpoint import latest_checkpoint

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    return latest_checkpoint(folder / "checkpoints") or folder


def _model_class(folder: Path) -> str | None:
    """The `model_class` a stack member's config.json records (None when unreadable: the caller's error names it)."""
    import json

    try:
        return json.loads((checkpoint_folder(folder) / "config.json").read_text()).get("model_class")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_sha256s(ckpt_dir: str | Path, upsample: bool = False) -> dict[str, str]:
    """sha256 of each stack member's model.safetensors ({"autoencoder": hex, ...}; the upsampler when `upsample`; a
    stack on 3D-autoencoder latents has no image_ldm / interpolation): the identity a generated dataset records of
    the models that made it.

    Raises:
        CheckpointError: a member folder or its model.safetensors is missing (names the file).
    """
    root = Path(ckpt_dir)
    out: dict[str, str] = {}
    latent_3d = _model_class(root / "autoencoder") == "video_autoencoder_3d"
    for name in MODEL_DIRS:
        if (name == "upsampler" and not upsample) or (latent_3d and name in LATENT_3D_ABSENT):
            continue
        weights = checkpoint_folder(root / name) / "model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{weights}: {name}: weights file not found")
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def stack_fps(models: RolloutModels) -> float | None:
    """Output frame rate the stack was trained for: the interpolation model's `data_fps / frame_stride` (on 3D
    latents, with no interpolation model, the prediction model's: every video frame of its training clips is
    decoded); None when that checkpoint does not record `data_fps`.

    Raises:
        ConfigError: the prediction and interpolation models were trained on clips of different frame rates.
    """
    if models.interpolation is None:
        pred = models.prediction.config
        return None if pred.data_fps is None else pred.data_fps / pred.frame_stride
    interp, pred = models.interpolation.config, models.prediction.config
    if interp.data_fps is None:
        return None
    if pred.data_fps is not None and abs(pred.data_fps - interp.data_fps) > 1e-6 * interp.data_fps:
        raise ConfigError(f"stack: data_fps: the prediction model was trained on {pred.data_fps:g} fps clips, the "
                          f"interpolation model on {interp.data_fps:g} fps clips")
    return interp.data_fps / interp.frame_stride


def resolve_fps(cfg: RolloutConfig, models: RolloutModels, source: str = "rollout config") -> RolloutConfig:
    """`cfg` with its output fps fixed by the stack (`stack_fps`): filled in when None, checked when given.

    Raises:
        ConfigError: `cfg.fps` contradicts the fps the stack was trained for (a rollout on the wrong timeline writes
            video and boxes 3x too slow or fast, silently), or neither says an fps.
    """
    fps = stack_fps(models)
    if cfg.fps is None:
        if fps is None:
            raise ConfigError(f"{source}: fps: the stack's checkpoints do not record the frame rate they were trained "
                              "at; give it with --set fps=N (training-data fps / interpolation.frame_stride)")
        return dataclasses.replace(cfg, fps=fps)
    if fps is not None and abs(cfg.fps - fps) > 1e-6 * fps:
        name, last = ("interpolation", models.interpolation) if models.interpolation is not None else (
            "prediction", models.prediction)
        raise ConfigError(f"{source}: fps: {cfg.fps:g} contradicts the stack, trained for {fps:g} fps (clips of "
                          f"{last.config.data_fps:g} fps, {name} frame_stride {last.config.frame_stride}); drop the "
                          "setting to follow the stack")
    return cfg


def init_checkpoint_dir(out: str | Path, preset_name: str = "tiny", seed: int = 0, upsampler: bool = True,
                        output_std: float = 0.02, data_fps: float | None = 10.0, latent_space: str = "kl-f8") -> Path:
    """Write a checkpoint dir of RANDOMLY INITIALISED models of a preset (mechanics tests and benchmarks only:
    the frames are noise-like, the timing and memory are those of the real models).

    The zero-initialised output convolutions are re-drawn with std `output_std` so every network's output
    depends on its input (a zero output would make all frames independent of the context). The video models
    record `data_fps` as training fps (None: not recorded, as in older checkpoints). `latent_space` "3d": the stack
    of LVDM's base model, the preset's 3D autoencoder and a prediction model with frame_stride 1 (no image LDM, no
    interpolation model).
    """
    from drivesim.autoencoder import VideoAutoencoder, VideoAutoencoder3D
    from drivesim.configs import get_preset
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.models.upsampler import Upsampler
    from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM
    from drivesim.training.checkpoint import save_model

    preset = get_preset(preset_name)
    torch.manual_seed(seed)
    out = Path(out)
    if latent_space == "3d":
        cfg = dataclasses.replace(preset.prediction, data_fps=data_fps, frame_stride=1)
        pred = PredictionLDM(dataclasses.replace(cfg, temporal=dataclasses.replace(cfg.temporal, train_spatial=True)))
        nn.init.normal_(pred.unet.spatial.out_conv.weight, std=output_std)
        models: dict[str, nn.Module] = {"autoencoder": VideoAutoencoder3D(preset.autoencoder_3d), "prediction": pred}
    else:
        image = ImageLDM(preset.image_ldm)
        nn.init.normal_(image.unet.out_conv.weight, std=output_std)
        models = {
            "autoencoder": VideoAutoencoder(dataclasses.replace(preset.autoencoder, video_decoder=True)),
            "image_ldm": image,
            "prediction": PredictionLDM.from_image_ldm(image, dataclasses.replace(preset.prediction,
                                                                                  data_fps=data_fps)),
            "interpolation": InterpolationLDM.from_image_ldm(image, dataclasses.replace(preset.interpolation,
                                                                                        data_fps=data_fps)),
        }
    if upsampler:
        up = Upsampler(preset.upsampler)
        nn.init.normal_(up.unet.spatial.out_conv.weight, std=output_std)
        models["upsampler"] = up
    for name, model in models.items():
        save_model(model, out / name)
    return out
