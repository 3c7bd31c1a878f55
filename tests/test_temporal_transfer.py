"""benchmarks/temporal_transfer.py end to end on tiny-preset random-weight models and two 17-frame val clips (one
window each, 2 sampler steps, 1 seed): a donor's temporal layers carried by `transfer_temporal` onto a differently
initialised backbone image LDM, against the same models at alpha = 1 and against video models with other temporal
layers on that backbone. The report's fields, the hashes, cards and training steps, the verdict recomputed from
the rows, the alpha1 and transferred rows against `video_ldm_temporal.py` run on the transferred models, and
errors that name the argument. Random weights: mechanics only, not quality."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from drivesim.datasets.clips import write_synthetic_dataset
from drivesim.eval.weights import weights_path

import drivesim
from drivesim.configs import get_preset
from drivesim.models.image_ldm import ImageLDM
from drivesim.models.video_ldm import InterpolationLDM, PredictionLDM
from drivesim.pipeline.encode import encode_dataset
from drivesim.pipeline.transfer import transfer_temporal
from drivesim.rollout import init_checkpoint_dir
from drivesim.training.checkpoint import COMPLETE_MARKER, save_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "temporal_transfer.py"
TINY = get_preset("tiny")
LATENTS = "a" * 64  # the same recorded latent space for every model: the transfer checks it
VIDEO = {"prediction": (PredictionLDM, TINY.prediction), "interpolation": (InterpolationLDM, TINY.interpolation)}
HAVE_I3D = weights_path("i3d") is not None
MODELS = ("transferred_prediction", "transferred_interpolation", "retrained_prediction", "retrained_interpolation")
METRICS = ("fvd", "fvd_vs_recon", "diff1", "diff2")


def _randomize(module: torch.nn.Module, seed: int, names=None, scale: float = 0.2) -> None:
    """Noise into the parameters (`names`: only those): zero-initialised layers (temporal outputs, mask conv, out
    conv) would make every variant the same model; the alphas move away from their 0.5 start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name in names:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _image(seed: int) -> ImageLDM:
    model = ImageLDM(dataclasses.replace(TINY.image_ldm, encoder_id=LATENTS))
    _randomize(model, seed)
    return model.eval()


def _video(task: str, image: ImageLDM, seed: int) -> torch.nn.Module:
    """A video model on `image`'s spatial layers with random temporal layers (a trained-looking one)."""
    cls, cfg = VIDEO[task]
    model = cls.from_image_ldm(image, dataclasses.replace(cfg, encoder_id=LATENTS, data_fps=10.0))
    _randomize(model, seed, {n for n, _ in model.named_parameters()
                             if n.removeprefix("unet.") not in model.unet.spatial_parameter_names})
    return model.eval()


def _run(model: torch.nn.Module, run: Path, step: int) -> Path:
    """`model` exported as a training run's run/model-ema beside a complete checkpoint at `step` (the layout
    `drivesim train` writes; its trainer_state.json is what the report reads)."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (ckpt / COMPLETE_MARKER).write_text("")
    return save_model(model, run / "model-ema")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Data, autoencoder, latent cache, and the models: donors (temporal layers) trained on an `original` image LDM,
    a `backbone` image LDM with other spatial weights, the transferred pair (donor on backbone) and a retrained
    pair (other temporal layers on the backbone). Donors, backbone and the retrained prediction model sit in fake
    training runs so their steps can be found."""
    root = tmp_path_factory.mktemp("temporal_transfer")
    write_synthetic_dataset(root / "data", clips=4, frames=17, size=(32, 64))  # clips 1 and 3 are val
    init_checkpoint_dir(root / "stack", "tiny", seed=0, upsampler=False)
    paths = {"root": root, "data": root / "data", "ae": root / "stack" / "autoencoder", "cache": root / "latents.h5"}
    encode_dataset(paths["ae"], paths["data"], paths["cache"], dtype="float32", log=lambda _: None)
    original, backbone = _image(1), _image(2)
    paths["backbone"] = _run(backbone, root / "backbone_run", 9)
    for i, task in enumerate(VIDEO):
        donor = _video(task, original, 10 + i)
        paths[f"donor_{task}"] = (_run(donor, root / "donor_pred_run", 7) if task == "prediction"
                                  else save_model(donor, root / f"donor_{task}"))
        paths[f"transferred_{task}"] = root / f"transferred_{task}"
        transfer_temporal(paths[f"donor_{task}"], paths["backbone"], paths[f"transferred_{task}"], log=lambda _: None)
        retrained = _video(task, backbone, 20 + i)
        paths[f"retrained_{task}"] = (_run(retrained, root / "retrained_pred_run", 5) if task == "prediction"
                                      else save_model(retrained, root / f"retrained_{task}"))
    return paths


def _args(setup: dict[str, Path], out: Path, **change) -> list[str]:
    values = {k: setup[k] for k in ("data", "cache", "ae", *MODELS)} | change
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))] + [
        "--out", str(out), "--steps", "2", "--seeds", "1"]


@pytest.fixture(scope="module")
def report(load_script, setup) -> dict:
    out = setup["root"] / "out"
    rep = load_script(SCRIPT).main(_args(setup, out) + ["--json", str(setup["root"] / "result.json")])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    assert json.loads((setup["root"] / "result.json").read_text()) == json.loads(json.dumps(rep))
    return rep


def test_report_fields_rows_hashes_and_training(report, setup):
    assert {"benchmark", "protocol", "command", "models", "sha256", "model_cards", "train_steps", "training",
            "backbone_check", "alphas", "real_clips", "generated_clips", "resolution", "seeds", "generation_s",
            "fvd_skipped", "fvd_recon", "flicker_real", "flicker_recon", "per_seed", "rows", "verdict",
            "machine"} <= set(report)
    assert report["command"].startswith("python benchmarks/temporal_transfer.py --data ")
    assert report["real_clips"] == 2 and report["generated_clips"] == 2 and report["resolution"] == [32, 64]
    assert report["seeds"] == [0] and report["steps"] == 2 and report["generation_s"] > 0
    assert set(report["rows"]) == {"transferred", "alpha1", "retrained"}
    for row in report["rows"].values():
        assert set(row) == set(METRICS)
        for m in ("diff1", "diff2"):
            assert np.isfinite(row[m]["mean"]) and row[m]["mean"] > 0 and row[m]["std"] == 0.0  # one seed
        for m in ("fvd", "fvd_vs_recon"):
            if HAVE_I3D:
                assert np.isfinite(row[m]["mean"]) and row[m]["mean"] > 0
            else:
                assert row[m] is None
    assert (report["fvd_skipped"] is None) == HAVE_I3D
    # the transferred models' temporal layers act: forcing alpha = 1 changes the frames
    assert all(report["alphas"][m]["min"] < 1 for m in MODELS)
    t, a1 = report["rows"]["transferred"], report["rows"]["alpha1"]
    assert t["diff1"]["mean"] != a1["diff1"]["mean"] and t["diff2"]["mean"] != a1["diff2"]["mean"]

    for key in ("ae", *MODELS):
        digest = hashlib.sha256((setup[key] / "model.safetensors").read_bytes()).hexdigest()
        assert report["sha256"][key] == digest, key
    for task in VIDEO:
        card = report["model_cards"][f"transferred_{task}"]
        assert card == json.loads((setup[f"transferred_{task}"] / "model_card.json").read_text())
        assert card["temporal_from"]["path"] == str(setup[f"donor_{task}"])
    # donor prediction run: 7 steps, backbone run: 9, retrained prediction run: 5; the rest are bare exports
    assert report["train_steps"] == {
        "transferred_prediction": {"temporal": 7, "spatial": 9},
        "transferred_interpolation": {"temporal": None, "spatial": 9},
        "retrained_prediction": {"temporal": 5, "spatial": 9},
        "retrained_interpolation": {"temporal": None, "spatial": 9},
    }
    assert report["backbone_check"] == {"prediction": True, "interpolation": True, "transferred_pair": True}
    assert report["notes"] == []


def test_verdict_is_the_rows_distances(report):
    v = report["verdict"]
    assert set(v["metrics"]) == set(METRICS) and "rule" in v
    for m, entry in v["metrics"].items():
        if report["rows"]["transferred"][m] is None:  # FVD without I3D weights
            assert entry["closer_to"] is None and entry["transfer_works"] is None
            continue
        a, b, c = (report["rows"][n][m]["mean"] for n in ("transferred", "alpha1", "retrained"))
        assert entry["dist_retrained"] == pytest.approx(abs(a - c), rel=1e-12)
        assert entry["dist_alpha1"] == pytest.approx(abs(a - b), rel=1e-12)
        assert entry["closer_to"] == ("retrained" if abs(a - c) < abs(a - b) else "alpha1")
        assert entry["transfer_works"] is (abs(a - c) < abs(a - b))
    assert v["transfer_works_fvd_recon"] is v["metrics"]["fvd_vs_recon"]["transfer_works"]
    assert v["transfer_works_diff2"] is v["metrics"]["diff2"]["transfer_works"]


def test_verdict_rule_on_known_numbers(load_script):
    def row(x):
        return {"mean": x, "std": 0.0, "min": x, "max": x}

    means = {"fvd": (10.0, 30.0, 12.0), "fvd_vs_recon": (10.0, 12.0, 30.0), "diff1": (1.0, 2.0, 0.0),
             "diff2": (0.5, 0.25, 0.25)}  # diff1 and diff2: ties, which count against the transfer
    summary = {f"{m}/{n}": row(x) for m, xs in means.items() for n, x in zip(("transferred", "alpha1", "retrained"),
                                                                            xs, strict=True)}
    v = load_script(SCRIPT).verdict(summary)
    assert [v["metrics"][m]["closer_to"] for m in METRICS] == ["retrained", "alpha1", "alpha1", "alpha1"]
    assert v["metrics"]["fvd"]["dist_retrained"] == 2.0 and v["metrics"]["fvd"]["dist_alpha1"] == 20.0
    assert v["transfer_works_fvd_recon"] is False and v["transfer_works_diff2"] is False
    summary["fvd/alpha1"] = None  # FVD skipped
    assert load_script(SCRIPT).verdict(summary)["metrics"]["fvd"]["transfer_works"] is None


def test_backbone_check_tells_backbones_apart(load_script, setup):
    same = load_script(SCRIPT).same_spatial
    tp, rp, ti = (drivesim.load(setup[k]) for k in ("transferred_prediction", "retrained_prediction",
                                                     "transferred_interpolation"))
    assert same(tp, rp) and same(tp, ti)
    assert not same(tp, drivesim.load(setup["donor_prediction"]))  # the donor sits on the original image LDM


@pytest.mark.skipif(not HAVE_I3D, reason="video_ldm_temporal.py needs the I3D weights: "
                                         "run `drivesim eval weights --name i3d`")
def test_alpha1_and_transferred_rows_are_video_ldm_temporal_rows(report, setup):
    """video_ldm_temporal.py on the transferred pair, same seeds, steps and batch: its `alpha1` row is this alpha1
    row and its `video` row the transferred row, number for number."""
    vlt = sys.modules["video_ldm_temporal"]  # imported by temporal_transfer.py as its sibling
    out = setup["root"] / "vlt"
    try:
        ref = vlt.main(["--data", str(setup["data"]), "--cache", str(setup["cache"]), "--ae", str(setup["ae"]),
                        "--prediction", str(setup["transferred_prediction"]), "--interpolation",
                        str(setup["transferred_interpolation"]), "--out", str(out), "--steps", "2", "--seeds", "1"])
    finally:
        torch.set_grad_enabled(True)  # the script switches autograd off for its process
    for name, theirs in (("alpha1", "alpha1"), ("transferred", "video")):
        for m in METRICS:
            assert report["rows"][name][m] == ref["summary"][f"{m}/{theirs}"], (name, m)
    assert report["fvd_recon"] == ref["fvd_recon"] and report["flicker_real"] == ref["flicker_real"]


@pytest.mark.parametrize("key", ["cache", "ae", "retrained_interpolation"])
def test_missing_path_names_the_argument(load_script, setup, tmp_path, capsys, key):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exc:
        load_script(SCRIPT).main(_args(setup, tmp_path / "out", **{key: missing}))
    assert exc.value.code == 2
    assert f"--{key.replace('_', '-')}: {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrong_model_names_the_argument(load_script, setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script(SCRIPT).main(_args(setup, tmp_path / "out",
                                       transferred_prediction=setup["transferred_interpolation"]))
    err = capsys.readouterr().err
    assert "--transferred-prediction: " in err and "expected PredictionLDM" in err
    with pytest.raises(SystemExit):
        load_script(SCRIPT).main(_args(setup, tmp_path / "out", ae=setup["data"]))  # a folder, not a checkpoint
    assert f"--ae: {setup['data']}: " in capsys.readouterr().err
