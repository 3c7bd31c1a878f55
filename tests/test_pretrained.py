"""The checkpoints shipped in drivesim.pretrained: present, documented by a model card, loadable, matching the preset
they serve, and doing what their card says (a reconstruction check on committed val frames)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from drivesim.datasets.clips import load_clip, read_manifest
from safetensors import safe_open

from drivesim.configs import get_preset
from drivesim.pipeline.demo import to_dict_cfg
from drivesim.pretrained import CARD_NAME, model_card, shipped_checkpoint, shipped_detector_for
from drivesim.training.checkpoint import load_model

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def test_cpu_small_autoencoder_is_shipped_with_a_card():
    folder = shipped_checkpoint("autoencoder", "cpu-small")
    assert folder is not None, "drivesim/pretrained/autoencoder-cpu-small is missing"
    card = model_card(folder)
    for key in ("command", "ship_command", "data", "steps", "seed", "psnr_db", "ap50_reconstructions",
                "ap50_real_frames", "scale_factor"):
        assert key in card, key
    assert card["command"].startswith("drivesim train autoencoder --preset cpu-small")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # the file is float16 (a few MB in git)
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys() if f.get_tensor(k).is_floating_point())
    assert (folder / "model.safetensors").stat().st_size < 8 * 2 ** 20
    ae = load_model(folder)
    assert ae.config.scale_factor == pytest.approx(card["scale_factor"]) and ae.config.scale_factor != 1.0
    # the demo accepts it for cpu-small: same network as the preset's autoencoder block
    assert to_dict_cfg(ae.config) == to_dict_cfg(get_preset("cpu-small").autoencoder)
    # the card holds every command from nothing: each run started `--init-from` another nests that one's card as
    # `base`, down to a run trained from scratch, and the steps add up to the total
    level, steps = card, 0
    while "--init-from" in level["command"]:
        assert "base" in level, f"a run started --init-from another does not nest its card: {level['command']}"
        steps, level = steps + level["steps"], level["base"]
    assert card.get("total_steps", card["steps"]) == steps + level["steps"]


@pytest.mark.skipif(not (SAMPLE / "manifest.json").is_file(), reason="the committed sample data/sample is absent")
def test_shipped_autoencoder_reconstructs_val_frames_as_its_card_says():
    folder = shipped_checkpoint("autoencoder", "cpu-small")
    card = model_card(folder)
    ae = load_model(folder)
    entry = next(e for e in read_manifest(SAMPLE).clips if e.split == "val")
    frames, _ = load_clip(entry)
    x = torch.from_numpy(frames[::4].copy()).permute(0, 3, 1, 2).float().div(127.5).sub(1)[None]
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    mse = ((rec - x) / 2).square().mean().item()
    psnr = 10 * np.log10(1.0 / mse)
    # one clip of 8 frames vs the card's 512 frames: within 3 dB
    assert psnr > card["psnr_db"]["frame"] - 3.0, (psnr, card["psnr_db"]["frame"])


def test_shipped_detector_is_tied_to_the_data_it_was_trained_on(tmp_path):
    folder = shipped_detector_for(SAMPLE)
    if not (SAMPLE / "manifest.json").is_file():
        pytest.skip("the committed sample data/sample is absent")
    assert folder is not None, "drivesim/pretrained/detector-metadrive-sample is missing"
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["command"].startswith("drivesim eval train-detector")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    assert shipped_detector_for(other) is None  # another dataset gets no detector silently


def test_demo_installs_shipped_checkpoints_and_from_scratch_trains(tmp_path, monkeypatch):
    # the demo's choice, on tiny stand-ins: shipped autoencoder + image LDM (tied by the encoder identity)
    from drivesim.datasets.clips import write_synthetic_dataset

    import drivesim.pretrained as pretrained
    from drivesim.autoencoder import AutoencoderKL
    from drivesim.autoencoder.model import encoder_id
    from drivesim.models.image_ldm import ImageLDM
    from drivesim.pipeline.demo import DEMO_DEFAULTS, Demo, DemoSettings
    from drivesim.training.checkpoint import save_model

    tiny = get_preset("tiny")
    root = tmp_path / "pretrained"
    torch.manual_seed(0)
    ae = AutoencoderKL(tiny.autoencoder)
    save_model(ae, root / "ae")
    ldm_cfg = dataclasses.replace(tiny.image_ldm, encoder_id=encoder_id(*ae.encoder_fingerprint()))
    save_model(ImageLDM(ldm_cfg), root / "ldm")
    (root / "ae" / CARD_NAME).write_text(json.dumps({"command": "drivesim train autoencoder ...", "steps": 3,
                                                       "total_steps": 7}))  # fine-tuned: 3 of its 7 steps last
    card = {"command": "drivesim train image_ldm ...", "steps": 9}
    (root / "ldm" / CARD_NAME).write_text(json.dumps(card))
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", root)
    monkeypatch.setattr(pretrained, "SHIPPED", {("autoencoder", "tiny"): "ae", ("image_ldm", "tiny"): "ldm"})
    data = tmp_path / "data"
    write_synthetic_dataset(data, clips=2, frames=4)
    d = DEMO_DEFAULTS["tiny"]

    def demo(**kw):
        return Demo(DemoSettings(data=data, preset_name="tiny", out=tmp_path / "out", from_stage=None, budgets={},
                                 rollout_minutes=0.01, rollout_sets=[], eval_n=2, pool=1, seed=0, quiet=True,
                                 as_json=False, estimate_min=d["estimate_min"], **kw))

    plain = demo()
    assert plain.pretrained_autoencoder() == root / "ae" and plain.pretrained_image_ldm() == root / "ldm"
    info = plain._run_autoencoder(False)
    assert info["weights"] == "pretrained" and info["steps"] == 7
    assert (tmp_path / "out" / "train" / "autoencoder" / "model" / "model.safetensors").is_file()
    plain.state.start("autoencoder", "x")
    plain.state.finish("autoencoder", 0.0, info)
    info = plain._run_image_ldm(False)
    assert info["weights"] == "pretrained" and Path(info["export"]).is_dir()
    # an image LDM is only used with the autoencoder it was trained on; --from-scratch trains both
    assert demo(train_autoencoder=True).pretrained_image_ldm() is None
    scratch = demo(train_autoencoder=True, from_scratch=True)
    assert scratch.pretrained_autoencoder() is None and scratch.pretrained_image_ldm() is None
    # a decoder-only fine-tune of the autoencoder keeps the encoder, so the latent space: the image LDM still fits
    with torch.no_grad():
        next(ae.decoder.parameters()).add_(1.0)
    save_model(ae, root / "ae")
    assert demo().pretrained_image_ldm() == root / "ldm"
    # another encoder is another latent space: the image LDM trained on the old one is not used
    with torch.no_grad():
        next(ae.encoder.parameters()).add_(1.0)
    save_model(ae, root / "ae")
    assert demo().pretrained_image_ldm() is None


def test_cpu_small_image_ldm_is_shipped_and_tied_to_its_autoencoder():
    from drivesim.autoencoder.model import encoder_id
    from drivesim.configs import to_dict

    folder = shipped_checkpoint("image_ldm", "cpu-small")
    assert folder is not None, "drivesim/pretrained/image-ldm-cpu-small is missing"
    card = model_card(folder)
    for key in ("command", "encode_command", "steps", "autoencoder_sha256", "ap50"):
        assert key in card, key
    ae_folder = shipped_checkpoint("autoencoder", "cpu-small")
    assert (folder / "model.safetensors").stat().st_size < 15 * 2 ** 20
    ldm = load_model(folder, "image_ldm")
    # trained on the shipped autoencoder's latents (the rollout checks this identity) and the preset's network
    assert ldm.config.encoder_id == encoder_id(*load_model(ae_folder).encoder_fingerprint())
    assert to_dict(dataclasses.replace(ldm.config, encoder_id=None)) == to_dict(get_preset("cpu-small").image_ldm)
    # every command from nothing: a fine-tune nests what it started from (a run's command, or a shipped card)
    level, steps = card, 0
    while "--init-from" in level["command"]:
        init = level["init_from"]
        steps += level["fine_tune_steps"]
        level = init.get("card", init)
    assert card["steps"] == steps + level["steps"]
