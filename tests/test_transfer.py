"""`drivesim stack transfer`: a donor video model's temporal layers on another image LDM's spatial layers (Video LDM
sec. 4.3). Spatial tensors are the backbone's and temporal tensors the donor's, bit for bit, the names partitioned
exactly; with alpha forced to 1 the result is the backbone image LDM; mismatches are one-line errors that write
nothing; the export loads, samples and rolls out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from drivesim.cli.main import main

import drivesim
from drivesim.configs import get_preset
from drivesim.models.image_ldm import ImageLDM
from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM
from drivesim.nn.temporal import force_alpha_one
from drivesim.pipeline.transfer import TRAINING_ONLY_UNET_FIELDS, combine, split_keys
from drivesim.training.checkpoint import read_tensors, save_model
from drivesim.types import Conditioning

TINY = get_preset("tiny")
H, W = 4, 8  # tiny latents (32x64 pixels / 8)
LATENTS_A, LATENTS_B = "a" * 64, "b" * 64
DONORS = {"prediction": (PredictionLDM, TINY.prediction), "interpolation": (InterpolationLDM, TINY.interpolation)}


def _randomize(module: torch.nn.Module, seed: int, names=None, scale: float = 0.2) -> None:
    """Noise into the parameters (`names`: only those): the zero-initialised layers (temporal outputs, mask conv,
    stage table, gates, out conv) would otherwise make the equalities below hold for any source."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name in names:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _image(seed: int, encoder_id: str | None = LATENTS_A, diffusion: dict | None = None, **unet) -> ImageLDM:
    base = TINY.image_ldm
    cfg = dataclasses.replace(base, encoder_id=encoder_id, unet=dataclasses.replace(base.unet, **unet),
                              diffusion=dataclasses.replace(base.diffusion, **(diffusion or {})))
    model = ImageLDM(cfg)
    _randomize(model, seed)
    return model.eval()


def _donor(task: str, image: ImageLDM, seed: int) -> torch.nn.Module:
    cls, cfg = DONORS[task]
    donor = cls.from_image_ldm(image, dataclasses.replace(cfg, encoder_id=image.config.encoder_id, data_fps=10.0))
    temporal = {n for n, _ in donor.named_parameters() if n.removeprefix("unet.") not in
                donor.unet.spatial_parameter_names}
    _randomize(donor, seed, temporal)  # trained-looking temporal layers, alphas away from their 0.5 start
    return donor.eval()


def _by_name(keys) -> tuple[set[str], set[str]]:
    """(spatial, temporal) by the naming rule of `VideoUNet`, independent of `split_keys`: temporal layers live in
    the blocks' `temporal` dicts (mixers, mask conv), the stage label in `stage_embedding`."""
    temporal = {k for k in keys if ".temporal." in k or ".stage_embedding." in k}
    return set(keys) - temporal, temporal


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Exported tiny checkpoints: the image LDM the donors were trained on, the donors, and a backbone with other
    spatial weights (a fine-tune of it) on the same latents."""
    root = tmp_path_factory.mktemp("transfer")
    torch.manual_seed(0)
    original, backbone = _image(1), _image(2)
    paths = {"original": save_model(original, root / "original"), "backbone": save_model(backbone, root / "backbone")}
    for i, task in enumerate(DONORS):
        paths[task] = save_model(_donor(task, original, 10 + i), root / task)
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("task", list(DONORS))
def test_spatial_from_backbone_temporal_from_donor_bit_for_bit(ckpts, task, tmp_path):
    out = tmp_path / "out"
    assert main(["stack", "transfer", "--temporal", str(ckpts[task]), "--backbone", str(ckpts["backbone"]),
                 "--out", str(out)]) == 0
    got = read_tensors(out / "model.safetensors")
    donor = read_tensors(ckpts[task] / "model.safetensors")
    image = read_tensors(ckpts["backbone"] / "model.safetensors")
    spatial, temporal = _by_name(got)
    # exact partition: every tensor comes from exactly one source, none from neither
    assert set(got) == set(donor) and spatial | temporal == set(got) and not spatial & temporal
    assert spatial == {"unet.spatial." + k.removeprefix("unet.") for k in image}
    assert any(k.endswith("blender.mix_factor") for k in temporal)
    assert any(k.endswith("temporal.0.conv.weight") for k in temporal)  # LVDM's context-mask conv
    assert any("stage_embedding" in k for k in temporal) == (task == "interpolation")
    for k in spatial:
        src = image["unet." + k.removeprefix("unet.spatial.")]
        assert got[k].dtype == src.dtype and torch.equal(got[k], src), k
    for k in temporal:
        assert got[k].dtype == donor[k].dtype and torch.equal(got[k], donor[k]), k
    # the test can fail: the donor's own spatial weights are not the backbone's
    assert not all(torch.equal(donor[k], got[k]) for k in spatial)
    # split_keys (what the code uses) agrees with the naming rule
    model = drivesim.load(out)
    assert split_keys(model, drivesim.load(ckpts["backbone"])) == (frozenset(spatial), frozenset(temporal))

    meta = json.loads((out / "config.json").read_text())
    donor_cfg = drivesim.load(ckpts[task]).config
    assert model.config == dataclasses.replace(donor_cfg, unet=drivesim.load(ckpts["backbone"]).config.unet,
                                               encoder_id=LATENTS_A)
    assert meta["model_class"] == f"{task}_ldm" and isinstance(meta["format_version"], int)
    card = json.loads((out / "model_card.json").read_text())
    assert card["temporal_from"]["path"] == str(ckpts[task])
    assert card["temporal_from"]["sha256"] == _sha(ckpts[task] / "model.safetensors")
    assert card["spatial_from"]["path"] == str(ckpts["backbone"])
    assert card["spatial_from"]["sha256"] == _sha(ckpts["backbone"] / "model.safetensors")
    assert card["tensors"]["spatial"] == len(spatial) and card["tensors"]["temporal"] == len(temporal)
    assert card["latents"] == "same"


def test_onto_its_own_image_ldm_gives_the_donor_back(ckpts):
    donor = drivesim.load(ckpts["interpolation"])
    result = combine(donor, drivesim.load(ckpts["original"]))
    mine, theirs = result.state_dict(), donor.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _cond(b: int = 2, t: int = 4, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, t, 3, 2, generator=g) * 0.5
    return Conditioning(boxes=torch.cat([xy, xy + 0.3], -1), classes=torch.randint(0, 11, (b, t, 3), generator=g),
                        box_mask=torch.rand(b, t, 3, generator=g) > 0.3, night=torch.tensor([0, 1][:b]),
                        crowdedness=torch.tensor([2, 9][:b]))


def test_alpha_one_is_the_backbone_image_ldm_per_frame(ckpts, tmp_path):
    out = tmp_path / "pred"
    assert main(["stack", "transfer", "--temporal", str(ckpts["prediction"]), "--backbone", str(ckpts["backbone"]),
                 "--out", str(out)]) == 0
    model, backbone, donor = drivesim.load(out), drivesim.load(ckpts["backbone"]), drivesim.load(ckpts["prediction"])
    g = torch.Generator().manual_seed(3)
    x, t, cond = torch.randn(2, 4, 4, H, W, generator=g), torch.randint(0, 1000, (2,), generator=g), _cond()
    with torch.no_grad():
        ref = backbone.unet(x, t, cond)  # the image LDM: every frame of the (b t) batch on its own
        with force_alpha_one(model):
            one = model.unet(x, t, cond)
        free = model.unet(x, t, cond)
        with force_alpha_one(donor):
            donor_one = donor.unet(x, t, cond)
        # the same ops on the same (b t) batch: bit for bit
        assert one.dtype == ref.dtype and torch.equal(one, ref)
        assert not torch.allclose(free, ref, atol=1e-4)  # the carried temporal layers act when alpha < 1
        assert not torch.allclose(donor_one, ref, atol=1e-4)  # and the spatial layers are not the donor's
        # one frame at a time through the image LDM: a batch of b images instead of b t changes how the CPU kernels
        # block their sums (float32 reassociation), so equal to rounding only
        for k in range(x.shape[1]):
            frame = cond.replace(boxes=cond.boxes[:, k:k + 1], classes=cond.classes[:, k:k + 1],
                                 box_mask=cond.box_mask[:, k:k + 1])
            torch.testing.assert_close(backbone.unet(x[:, k:k + 1], t, frame)[:, 0], one[:, k], atol=1e-5,
                                       rtol=1e-5)
    # whole sampler loop, no context frames: the same noise, sampler and guidance as the image LDM's own sampling
    with force_alpha_one(model):
        video = model.sample(cond, (H, W), steps=2, sampler="ddim", generator=torch.Generator().manual_seed(5))
    image = backbone.sample(cond, (H, W), steps=2, sampler="ddim", generator=torch.Generator().manual_seed(5))
    assert torch.equal(video, image)


@pytest.mark.parametrize("task", list(DONORS))
def test_export_loads_and_samples_one_step(ckpts, task, tmp_path):
    out = tmp_path / task
    assert main(["stack", "transfer", "--temporal", str(ckpts[task]), "--backbone", str(ckpts["backbone"]),
                 "--out", str(out)]) == 0
    model = drivesim.load(out)
    assert type(model) is DONORS[task][0]
    g = torch.Generator().manual_seed(0)
    if task == "prediction":
        cond = _cond(1, 4)
        context = torch.randn(1, 1, 4, H, W, generator=g)
        z = model.predict(cond, context, steps=1, generator=g)
        assert torch.equal(z[:, :1], context)
    else:
        cond = _cond(1, 5)
        keys = torch.randn(1, 2, 4, H, W, generator=g)
        z = model.interpolate(cond, keys, stage=1, steps=1, generator=g)
        assert torch.equal(z[:, ::4], keys)
    assert z.shape[:3] == (1, cond.num_frames, 4) and torch.isfinite(z).all()


def test_a_transferred_stack_rolls_out(tmp_path):
    """`drivesim rollout` takes the transferred models beside the backbone as D/image_ldm."""
    from drivesim.datasets.clips import Box
    from drivesim.datasets.scenario import Scenario, save_scenario

    from drivesim.rollout import init_checkpoint_dir

    src = init_checkpoint_dir(tmp_path / "src", "tiny", seed=0, upsampler=False)
    new = tmp_path / "new"
    new.mkdir()
    shutil.copytree(src / "autoencoder", new / "autoencoder")
    backbone = _image(7, encoder_id=None)
    save_model(backbone, new / "image_ldm")
    for task in DONORS:
        assert main(["stack", "transfer", "--temporal", str(src / task), "--backbone", str(new / "image_ldm"),
                     "--out", str(new / task)]) == 0
    frames = [[Box("1", "car", 5 + k, 10, 25 + k, 26)] for k in range(9)]
    save_scenario(Scenario(fps=10.0, width=64, height=32, night=0, crowdedness=1, frames=frames), tmp_path / "s.json")
    assert main(["rollout", "--scenario", str(tmp_path / "s.json"), "--ckpt-dir", str(new), "--frames", "5",
                 "--out", str(tmp_path / "roll"), "--quiet", "--set", "steps=1"]) == 0
    assert (tmp_path / "roll" / "rollout.mp4").is_file()


# -- refusals ------------------------------------------------------------------------------------------------------

MISMATCHES = {
    # name: (backbone factory or checkpoint key, donor key, pattern the error line must contain)
    "channels": (lambda: _image(2, model_channels=32), "prediction", r"unet\.model_channels: 32, the donor's .* 16"),
    "nested field": (lambda: _image(2, boxes=dataclasses.replace(TINY.image_ldm.unet.boxes, max_boxes=4)),
                     "interpolation", r"unet\.boxes\.max_boxes: 4"),
    "parameterisation": (lambda: _image(2, diffusion={"prediction_type": "epsilon"}), "prediction",
                         r"diffusion\.prediction_type: 'epsilon', the donor has 'v_prediction'"),
    "other latents": (lambda: _image(2, encoder_id=LATENTS_B), "prediction",
                      r"encoder_id: trained on latents of another autoencoder .* --allow-other-latents"),
    "backbone not an image LDM": ("interpolation", "prediction", r"--backbone: model_class: 'interpolation_ldm' is "
                                                                 "not an image LDM"),
    "donor not a video model": ("backbone", "original",
                                r"--temporal: model_class: 'image_ldm' is not a prediction or interpolation"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_mismatch_is_one_line_and_writes_nothing(ckpts, case, tmp_path, capsys):
    backbone, donor, pattern = MISMATCHES[case]
    if callable(backbone):
        made = backbone()
        path = save_model(made, tmp_path / "in" / "backbone")
    else:
        path = ckpts[backbone]
    before = _tree(tmp_path)
    capsys.readouterr()
    rc = main(["stack", "transfer", "--temporal", str(ckpts[donor]), "--backbone", str(path), "--out",
               str(tmp_path / "runs" / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert _tree(tmp_path) == before, "the refused transfer left files behind"


def test_other_latents_only_with_the_flag_and_the_result_takes_the_backbones(ckpts, tmp_path, capsys):
    path = save_model(_image(2, encoder_id=LATENTS_B), tmp_path / "backbone")
    out = tmp_path / "out"
    argv = ["stack", "transfer", "--temporal", str(ckpts["prediction"]), "--backbone", str(path), "--out", str(out)]
    assert main(argv) == 1 and not out.exists()
    assert main([*argv, "--allow-other-latents"]) == 0
    assert drivesim.load(out).config.encoder_id == LATENTS_B
    card = json.loads((out / "model_card.json").read_text())
    assert card["latents"].startswith("different") and "--allow-other-latents" in card["command"]
    assert "different autoencoders' latents" in capsys.readouterr().err


def test_training_only_unet_fields_may_differ(ckpts, tmp_path):
    assert "dropout" in TRAINING_ONLY_UNET_FIELDS
    path = save_model(_image(2, dropout=0.1, drop_all_p=0.05), tmp_path / "backbone")
    out = tmp_path / "out"
    assert main(["stack", "transfer", "--temporal", str(ckpts["prediction"]), "--backbone", str(path), "--out",
                 str(out)]) == 0
    cfg = drivesim.load(out).config.unet
    assert (cfg.dropout, cfg.drop_all_p) == (0.1, 0.05)


def test_existing_or_input_out_is_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["stack", "transfer", "--temporal", str(ckpts["prediction"]), "--backbone", str(ckpts["backbone"])]
    assert main([*argv, "--out", str(out)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*argv, "--out", str(ckpts["prediction"]), "--overwrite"]) == 1  # never over the donor
    assert "would write over the input given as --temporal" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "model_card.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
