"""`drivesim demo --preset tiny`: the whole chain (train every stage, encode, scenarios, day + night rollouts,
evaluation, report) through `main([...])` on a small dataset: a few clips of the committed sample when it
exists, else a synthetic one. This is the CI smoke test of the demo; it runs the chain once (module fixture)
and checks resume / --from-stage / bad input against that run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from drivesim.cli.main import main
from drivesim.datasets.clips import read_annotation, read_manifest, read_video, write_manifest, write_synthetic_dataset
from drivesim.eval.weights import weights_path

from drivesim.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
HAVE_WEIGHTS = weights_path("i3d") is not None and weights_path("inception") is not None
STAGES = ("autoencoder", "encode", "video_decoder", "image_ldm", "prediction", "interpolation", "scenarios",
          "rollout", "eval", "report")


def _small_dataset(root: Path) -> Path:
    """4 train + 4 val clips (day and night in val when the sample has both), else a synthetic dataset."""
    if (SAMPLE / "manifest.json").is_file():
        entries = read_manifest(SAMPLE).clips
        train = [e for e in entries if e.split == "train"][:4]
        val_all = [e for e in entries if e.split == "val"]
        day = [e for e in val_all if read_annotation(e.annotation).night == 0][:2]
        night = [e for e in val_all if read_annotation(e.annotation).night == 1][:2]
        val = (day + night + [e for e in val_all if e not in day + night])[:4]
        root.mkdir(parents=True)
        for e in train + val:
            shutil.copyfile(e.video, root / e.video.name)
            shutil.copyfile(e.annotation, root / e.annotation.name)
        write_manifest(root, [(e.clip_id, e.split) for e in train + val], source="subset of data/sample")
        return root
    write_synthetic_dataset(root, clips=8, frames=32, size=(32, 64))
    return root


def _run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["demo", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    data = _small_dataset(base / "data")
    # a reference detector for the box-fidelity rows (seconds of training: the rows must exist, not be good)
    from drivesim.eval.detector import DetectorConfig, train_detector

    from drivesim.configs import TrainConfig

    det = base / "det"
    train_detector(data, det, DetectorConfig(resolution=(32, 64), base_channels=8, channel_mult=(1, 2, 2),
                                             output_stride=2),
                   TrainConfig(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.0,
                               checkpoint_every=1000, tracker=None), progress=False)
    out = base / "run"
    # module-scoped fixture: capture stdout ourselves (capsys is function-scoped)
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["demo", "--preset", "tiny", "--data", str(data), "--out", str(out), "--json", "--detector",
                   str(det)])
    assert rc == 0, buf_err.getvalue()[-3000:]
    return {"data": data, "out": out, "summary": json.loads(buf_out.getvalue()), "log": buf_err.getvalue(),
            "det": det}


def _state(out: Path) -> dict:
    return json.loads((out / "demo_state.json").read_text())


def test_demo_runs_every_stage_and_writes_the_report(demo_run):
    out, summary = demo_run["out"], demo_run["summary"]
    state = _state(out)
    assert [s for s in STAGES if state["stages"][s]["status"] == "done"] == list(STAGES)
    assert all(state["stages"][s]["seconds"] >= 0 for s in STAGES)
    for name in ("autoencoder", "video_decoder", "image_ldm", "prediction", "interpolation"):
        info = state["stages"][name]["info"]
        assert info["steps"] == 4 and Path(info["export"], "model.safetensors").is_file()
    # the checkpoint dir laid out as `drivesim rollout` expects it
    for name in ("autoencoder", "image_ldm", "prediction", "interpolation"):
        assert (out / "stack" / name / "config.json").is_file()
    assert summary["preset"] == "tiny" and summary["report"] == str(out / "report.html")

    page = (out / "report.html").read_text()
    assert "How these numbers were produced" in page and "preset <b>tiny</b>" in page
    assert page.count("<video") >= 2  # rollouts and real clips, embedded
    report = json.loads((out / "report.json").read_text())
    assert report["demo"]["preset"] == "tiny"
    assert set(report["demo"]["stages"]) == set(STAGES)
    assert "weak" in report["demo"]["note"]
    # box fidelity: the four rows, day/night fidelity and frame change, on the page and in the record
    assert "Do the frames follow the boxes?" in page and "box-fidelity-strip" in page
    record = json.loads((out / "eval" / "box_fidelity.json").read_text())
    assert set(record["rows"]) == {"real", "autoencoder", "generated", "shuffled"}
    assert record["frame_change"]["ratio"] > 0 and 0 <= record["day_night"]["generated_clips_matching"] <= 1
    assert report["box_fidelity"]["rows"]["real"]["all"]["num_gt"] > 0


def test_demo_rollouts_follow_the_day_and_night_scenarios(demo_run):
    clips = demo_run["out"] / "rollouts" / "clips"
    manifest = read_manifest(clips)
    assert [e.clip_id for e in manifest.clips] == ["day", "night"]
    for entry, night in zip(manifest.clips, (0, 1), strict=True):
        ann = read_annotation(entry.annotation)
        frames = read_video(entry.video)
        assert ann.night == night
        assert frames.shape == (36, 32, 64, 3) and ann.num_frames == 36  # 0.06 min at 10 fps, tiny 32x64
        assert frames.std() > 0  # not a blank video
        scen = json.loads((demo_run["out"] / "scenarios" / f"{entry.clip_id}.json").read_text())
        assert (scen["width"], scen["height"]) == (64, 32) and scen["night"] == night
        boxes = [b for f in ann.frames for b in f]
        assert boxes, "the scenario's boxes are the labels of the generated frames"
        assert all(0 <= b.x1 < b.x2 <= 64 and 0 <= b.y1 < b.y2 <= 32 for b in boxes)
        # rollout boxes are the scenario's, frame by frame (track ids may be renumbered when it is looped)
        assert [sorted((round(b.x1, 3), round(b.y1, 3), round(b.x2, 3), round(b.y2, 3)) for b in f)
                for f in ann.frames] == \
            [sorted((round(b["x1"], 3), round(b["y1"], 3), round(b["x2"], 3), round(b["y2"], 3)) for b in f["boxes"])
             for f in scen["frames"][:36]]


@pytest.mark.weights
@pytest.mark.skipif(not HAVE_WEIGHTS, reason="evaluator weights absent: run `drivesim eval weights --name all`")
def test_demo_evaluates_the_rollouts_when_weights_are_present(demo_run):
    m = demo_run["summary"]["metrics"]
    assert m is not None, "eval must run when the weights are present"
    assert all(math.isfinite(m[k]) for k in ("fvd", "fid", "kvd")) and m["fvd"] > 0 and m["n"] == 2
    report = json.loads((demo_run["out"] / "report.json").read_text())
    assert sorted(r["kind"] for r in report["results"]) == ["fvd_over_time", "videos"]
    curve = next(r for r in report["results"] if r["kind"] == "fvd_over_time")["curve"]
    assert [c["start_frame"] for c in curve] == [0, 16]  # two 16-frame windows in 36 frames
    assert "fvd-over-time-plot" in (demo_run["out"] / "report.html").read_text()


@pytest.mark.skipif(HAVE_WEIGHTS, reason="weights present: the evaluation runs (checked by the weights test)")
def test_demo_records_a_skipped_evaluation_without_weights(demo_run):
    info = _state(demo_run["out"])["stages"]["eval"]["info"]
    assert "evaluator weights absent" in info["skipped"]
    assert demo_run["summary"]["metrics"] is None
    assert "evaluator weights absent" in (demo_run["out"] / "report.html").read_text()


def test_demo_rerun_reuses_finished_stages_and_from_stage_reruns(demo_run, capsys):
    out, data = demo_run["out"], demo_run["data"]
    before = _state(out)["stages"]
    det = str(demo_run["det"])
    rc, stdout, err = _run(capsys, "--preset", "tiny", "--data", str(data), "--out", str(out), "--json",
                           "--detector", det)
    assert rc == 0, err
    assert _state(out)["stages"] == before  # nothing ran again
    assert json.loads(stdout)["wall_seconds_this_call"] < 30

    rc, _, err = _run(capsys, "--preset", "tiny", "--data", str(data), "--out", str(out), "--from-stage",
                      "report", "--quiet", "--detector", det)
    assert rc == 0, err
    after = _state(out)["stages"]
    assert {k: after[k] for k in STAGES[:-1]} == {k: before[k] for k in STAGES[:-1]}
    assert after["report"]["finished"] >= before["report"]["finished"] and (out / "report.html").is_file()

    # a changed budget invalidates that stage and everything after it, nothing before it (checked, not run)
    from drivesim.pipeline.demo import DEMO_DEFAULTS, Demo, DemoSettings

    d = DEMO_DEFAULTS["tiny"]
    settings = DemoSettings(data=data, preset_name="tiny", out=out, from_stage=None, budgets={"prediction": 1.0},
                            rollout_minutes=d["rollout_minutes"], rollout_sets=[], eval_n=d["eval_n"],
                            pool=d["pool"], seed=0, quiet=True, as_json=False, estimate_min=d["estimate_min"])
    demo = Demo(settings)
    changed = []
    for name in STAGES:
        demo.hashes[name] = demo.stage_hash(name)
        if demo.hashes[name] != before[name]["hash"]:
            changed.append(name)
    assert changed == ["prediction", "rollout", "eval", "report"]


def test_demo_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    data = tmp_path / "data"
    write_synthetic_dataset(data, clips=2, frames=4)
    cases = [
        (["--budget-minutes", "decoder=3"], "--budget-minutes"),
        (["--budget-minutes", "image_ldm=-1"], "image_ldm"),
        (["--from-stage", "upsample"], "--from-stage"),
        (["--preset", "huge"], "--preset"),
    ]
    for args, needle in cases:
        rc, _, err = _run(capsys, "--data", str(data), "--out", str(tmp_path / "o"), *args)
        assert rc == 1 and needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 1 and "manifest.json" in err
    # --from-stage needs the stages before it finished
    rc, _, err = _run(capsys, "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "o2"),
                      "--from-stage", "rollout")
    assert rc == 1 and "autoencoder" in err and "not finished" in err
    assert not (tmp_path / "o").exists()
    assert np.all([not p.name.startswith(".") for p in tmp_path.rglob("*")])


def test_demo_budgets_are_step_counts_by_default(tmp_path):
    # wall-clock budgets made the demo's models depend on machine load (150 vs 56 autoencoder steps): the default
    # budget is a number of optimizer steps; --budget-minutes only adds a limit when asked for
    from drivesim.pipeline.demo import DEFAULT_STEPS, DEMO_DEFAULTS, Demo, DemoSettings, parse_budgets

    data = tmp_path / "data"
    write_synthetic_dataset(data, clips=2, frames=4)
    d = DEMO_DEFAULTS["cpu-small"]

    def demo(steps, budgets):
        return Demo(DemoSettings(data=data, preset_name="cpu-small", out=tmp_path / "out", from_stage=None,
                                 budgets=budgets, rollout_minutes=1.0, rollout_sets=[], eval_n=2, pool=1, seed=0,
                                 quiet=True, as_json=False, estimate_min=d["estimate_min"], steps=steps))

    plain = demo(dict(DEFAULT_STEPS["cpu-small"]), {})
    for name in ("video_decoder", "image_ldm", "prediction", "interpolation"):
        tc = plain.train_cfg(name)
        assert tc.max_minutes is None and tc.max_steps == DEFAULT_STEPS["cpu-small"][name]
    timed = demo({"image_ldm": 7}, parse_budgets(["image_ldm=2.5"]))
    assert timed.train_cfg("image_ldm").max_steps == 7 and timed.train_cfg("image_ldm").max_minutes == 2.5
    assert parse_budgets(["prediction=12"], "--budget-steps", integer=True) == {"prediction": 12}
    with pytest.raises(ConfigError, match="--budget-steps"):
        parse_budgets(["prediction=1.5"], "--budget-steps", integer=True)
