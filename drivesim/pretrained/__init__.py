"""Small fp16 checkpoints shipped with drivesim, each with a model card (`model_card.json`).

Video LDM builds its video models on a PRETRAINED image autoencoder and image LDM (Blattmann et al. 2023, Sec. 3);
so does `drivesim demo`: with the cpu-small preset it starts from the checkpoints shipped here instead of training
them for minutes (an autoencoder trained for minutes cannot draw a car), and trains what Video LDM trains on top
(the decoder's temporal layers, the prediction and interpolation models), unless `--train-autoencoder` /
`--from-scratch` is given.

Each folder holds `model.safetensors` (fp16), `config.json` (the usual checkpoint header: format version, model
class, config with the scale factor already computed) and `model_card.json`: the command that reproduces it, seed,
data, steps, and its measured quality (PSNR, box AP50 of the reference detector on reconstructions vs real frames).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from drivesim.errors import CheckpointError

PRETRAINED_DIR = Path(__file__).resolve().parent

SHIPPED: dict[tuple[str, str], str] = {("autoencoder", "cpu-small"): "autoencoder-cpu-small",
                                       ("image_ldm", "cpu-small"): "image-ldm-cpu-small"}
"""(stage, preset) -> folder under `PRETRAINED_DIR`."""

CARD_NAME = "model_card.json"


def shipped_checkpoint(stage: str, preset: str) -> Path | None:
    """The shipped checkpoint folder for `stage` of `preset`, or None if drivesim ships none."""
    name = SHIPPED.get((stage, preset))
    if name is None:
        return None
    folder = PRETRAINED_DIR / name
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


def model_card(folder: str | Path) -> dict:
    """The model card of a shipped checkpoint folder.

    Raises:
        CheckpointError: missing or invalid model_card.json (named).
    """
    path = Path(folder) / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable model card ({e})") from None
    if not isinstance(card, dict) or "command" not in card:
        raise CheckpointError(f"{path}: command: missing (a model card says how to reproduce the weights)")
    return card


def weights_sha256(folder: str | Path) -> str:
    """sha256 of the folder's model.safetensors (what a run records as the checkpoint's identity)."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def install_checkpoint(folder: str | Path, dst: str | Path) -> Path:
    """Copy a shipped checkpoint folder to `dst` (replacing it only once the copy is complete), so later steps that
    write into a checkpoint (the encoder's scale factor) never touch the installed package."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(folder, tmp)
    except BaseException:  # a full disk, Ctrl-C, SIGTERM: no half copy left next to dst
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def shipped_detector_for(data_root: str | Path) -> Path | None:
    """The shipped reference detector trained on the dataset at `data_root` (its model card records the sha256 of
    that dataset's manifest.json), or None: a detector is only a fair judge of the data it was trained on."""
    manifest = Path(data_root) / "manifest.json"
    if not manifest.is_file():
        return None
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    for folder in sorted(PRETRAINED_DIR.glob("detector-*")):
        try:
            card = model_card(folder)
        except CheckpointError:
            continue
        if card.get("data_manifest_sha256") == digest and (folder / "model.safetensors").is_file():
            return folder
    return None
