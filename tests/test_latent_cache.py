"""HDF5 latent cache: round trip with a stand-in encoder, stale and truncated caches, atomic writes, full disks."""

import errno
import os

import h5py
import numpy as np
import pytest
import torch
from drivesim.datasets.clips import load_clip, read_manifest, write_synthetic_dataset
from drivesim.datasets.latent_cache import LatentCache, LatentCacheWriter, LatentClipDataset, encoder_id, write_cache
from drivesim.datasets.torch_data import ClipDataset
from einops import rearrange

from drivesim.errors import DataError, WriteError

MIX = torch.tensor([[0.5, 0.2, 0.1], [-0.3, 0.4, 0.2], [0.1, -0.1, 0.6], [0.25, 0.25, 0.25]])


def stand_in_encoder(x: torch.Tensor) -> torch.Tensor:
    """(t, 3, h, w) -> (t, 4, h/8, w/8): 8x8 average pooling, then a fixed 3 -> 4 channel map."""
    pooled = torch.nn.functional.avg_pool2d(x, 8)
    return torch.einsum("oc,tchw->tohw", MIX, pooled)


ENC_ID = encoder_id({"kind": "stand-in", "pool": 8}, "weights-sha256-abc")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("lc")
    write_synthetic_dataset(root / "data", clips=3, frames=5, size=(32, 64), splits=("train", "train", "val"))
    path = write_cache(root / "data", stand_in_encoder, root / "cache.h5", ENC_ID, batch_frames=2,
                       scale_factor=0.5, max_boxes=4, dtype="float32")
    return root, path


def test_encoder_id_depends_on_config_and_weights():
    assert encoder_id({"a": 1, "b": 2}, "w") == encoder_id({"b": 2, "a": 1}, "w")
    assert encoder_id({"a": 1}, "w") != encoder_id({"a": 2}, "w") != encoder_id({"a": 1}, "v")
    assert len(ENC_ID) == 64


def test_cache_layout_and_latents_match_independent_pooling(cached):
    root, path = cached
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1 and f.attrs["encoder_id"] == ENC_ID
        assert f.attrs["scale_factor"] == 0.5 and "created_by" in f.attrs
        g = f["clips/clip_0001"]
        assert g["latents"].shape == (5, 4, 4, 8) and g["latents"].chunks == (5, 4, 4, 8)
        assert g.attrs["split"] == "train" and g.attrs["night"] == 1 and g.attrs["fps"] == 10.0
        latents = g["latents"][()]
    frames, _ = load_clip(read_manifest(root / "data").clips[1])
    x = frames.astype(np.float64) / 127.5 - 1  # (t, h, w, 3)
    pooled = rearrange(x, "t (h p) (w q) c -> t c h w (p q)", p=8, q=8).mean(-1)
    expected = np.einsum("oc,tchw->tohw", MIX.double().numpy(), pooled)
    np.testing.assert_allclose(latents, expected, atol=1e-5)


def test_latent_dataset_matches_clip_dataset(cached):
    root, path = cached
    lds = LatentClipDataset(LatentCache(path, expected_encoder_id=ENC_ID), "train", num_frames=2, frame_stride=2)
    cds = ClipDataset(root / "data", "train", num_frames=2, frame_stride=2, max_boxes=4)
    assert len(lds) == len(cds) == 6
    a, b = lds[4], cds[4]
    assert set(a) - {"latents"} == set(b) - {"frames"}
    for k in ("boxes", "classes", "box_mask", "track_ids", "night", "crowdedness", "clip_id", "start"):
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) if k != "clip_id" else a[k] == b[k]
    torch.testing.assert_close(a["latents"], 0.5 * stand_in_encoder(b["frames"]), atol=1e-5, rtol=0)
    unscaled = LatentClipDataset(path, "train", num_frames=2, frame_stride=2, scaled=False)
    torch.testing.assert_close(unscaled[4]["latents"], 2 * a["latents"])
    batch = torch.utils.data.default_collate([lds[0], lds[1]])
    assert batch["latents"].shape == (2, 2, 4, 4, 8)


def test_stale_cache_is_refused(cached):
    _, path = cached
    other = encoder_id({"kind": "stand-in", "pool": 8}, "weights-sha256-NEW")
    with pytest.raises(DataError, match=rf"{path.name}: encoder_id: .*stale"):
        LatentCache(path, expected_encoder_id=other)


def test_truncated_cache_is_a_data_error(cached, tmp_path):
    _, path = cached
    data = path.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.h5: hdf5: cannot open"):
        LatentCache(bad)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataError, match=r"junk\.h5: hdf5"):
        LatentCache(junk)
    with pytest.raises(DataError, match=r"missing\.h5: latent cache: file not found"):
        LatentCache(tmp_path / "missing.h5")


def test_failed_write_leaves_no_cache(cached, tmp_path):
    root, _ = cached

    def broken(x):
        raise RuntimeError("encoder crashed")

    out = tmp_path / "c.h5"
    with pytest.raises(RuntimeError):
        write_cache(root / "data", broken, out, ENC_ID)
    assert list(tmp_path.iterdir()) == []
    with LatentCacheWriter(out, ENC_ID) as w:
        assert not out.exists()
        w.add_clip("a", np.zeros((2, 4, 1, 1)), _packed(2), night=0, crowdedness=0, fps=1.0, split="val",
                   width=8, height=8)
    assert LatentCache(out).clip_ids("val") == ["a"]


def _fail_writes_after(monkeypatch, nbytes: int, err: int = errno.ENOSPC) -> dict:
    """os.pwrite (the cache writer's only write call) fails with `err` once `nbytes` have been written."""
    real, count = os.pwrite, {"ok": 0, "bytes": 0}

    def pwrite(fd, data, offset):
        if count["bytes"] + len(data) > nbytes:
            raise OSError(err, os.strerror(err))
        count["ok"] += 1
        count["bytes"] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return count


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.97])
def test_full_disk_removes_the_temp_file_and_raises_one_line(cached, tmp_path, monkeypatch, capfd, fraction):
    # `drivesim encode` on a full disk printed thousands of HDF5 error lines, left its temp file and segfaulted
    root, good = cached
    out = tmp_path / "c.h5"
    count = _fail_writes_after(monkeypatch, int(good.stat().st_size * fraction))
    with pytest.raises(WriteError) as err:
        write_cache(root / "data", stand_in_encoder, out, ENC_ID, batch_frames=2, max_boxes=4, dtype="float32")
    assert str(err.value) == f"{out}: write: No space left on device; nothing was written"
    assert fraction == 0.0 or count["ok"] > 0  # the disk filled midway, after some writes went through
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr().err == ""  # no HDF5 error stack


def test_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    real = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteError, match=rf"^{tmp_path / 'c.h5'}: write: Read-only file system; nothing was written$"):
        LatentCacheWriter(tmp_path / "c.h5", ENC_ID)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _packed(t):
    from drivesim.bbox_conditioning.boxes import pack_boxes

    return pack_boxes([[]] * t, 8, 8, 16)


def test_dataloader_workers_reopen_the_file(cached):
    _, path = cached
    ds = LatentClipDataset(path, "train", num_frames=2, frame_stride=1)
    ds[0]  # the parent process holds an open handle before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b["clip_id"]) for b in batches) == len(ds) == 8
    torch.testing.assert_close(batches[0]["latents"][1], ds[1]["latents"])
