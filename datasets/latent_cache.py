"""HDF5 latent cache: a dataset's clips encoded once by the autoencoder, read by training without video decoding.

File layout (h5py)::

    /                      attrs: format="drivesim-latent-cache", format_version=1 (2 when frames_per_latent > 1),
                           encoder_id (sha256 hex, see `encoder_id`), scale_factor (float, the autoencoder's),
                           created_by, dataset (source folder), max_boxes; only when a latent frame stands for
                           several video frames (LVDM's 3D autoencoder: 4) also frames_per_latent (absent: 1) and
                           box_reduction (how each group of frames' boxes became one latent frame's:
                           `drivesim.bbox_conditioning.latent_frames`; absent: "none")
    /clips/<clip_id>/      attrs: night (0/1), crowdedness, fps (of the VIDEO frames), split, width, height (pixels
                           of the encoded frames); with frames_per_latent > 1 also num_video_frames (frames encoded:
                           T * frames_per_latent, the source's first ones) and source_frames (the clip's length)
        latents            (T, 4, h, w) float16 (default) or float32 UNSCALED latents (what the encoder returns),
                           one HDF5 chunk per clip, so reading a clip is one read; T latent frames
        boxes              (T, n, 4) float32 normalised xyxy      classes    (T, n) int64
        box_mask           (T, n) bool                            track_ids  (T, n) int64, -1 padding
                           (one box list per LATENT frame)
        video_boxes, video_classes, video_box_mask, video_track_ids   (only with frames_per_latent > 1) the same
                           per VIDEO frame, T * frames_per_latent of them, so nothing the reduction dropped is lost

Version 2 exists so that a reader of version 1, which knows nothing of frames_per_latent, refuses a cache whose latent
frames are not video frames; caches of per-frame latents are still written as version 1.

A cache is written to a temp file next to `path` and renamed on close, so a crash leaves no half cache; a failed
write (full or read-only disk, I/O error) removes the temp file and raises one `WriteError` naming `path`. A reader
given `expected_encoder_id` refuses a cache written by another encoder (config or weights changed), since its
latents no longer match what the decoder expects.

One module because the HDF5 layout's writer and reader are kept side by side so they cannot drift apart.
"""

from __future__ import annotations

import getpass
import os
import platform
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from drivesim.bbox_conditioning.boxes import PackedBoxes, pack_boxes
from drivesim.bbox_conditioning.latent_frames import BOX_REDUCTIONS, group_boxes
from drivesim.datasets.clips import ClipAnnotation, box_tuples, load_clip, pack_annotation, read_manifest
from drivesim.datasets.torch_data import enumerate_windows
from drivesim.datasets.transforms import frames_to_tensor, resize_frames
from torch.utils.data import Dataset

from drivesim.autoencoder.model import encoder_id as _encoder_id
from drivesim.errors import DataError, WriteError

if TYPE_CHECKING:
    from drivesim.datasets.scenario import Scenario

encoder_id = _encoder_id  # the cache's identity check (defined in the core, which latent models use too)

FORMAT = "drivesim-latent-cache"
FORMAT_VERSION = 2
"""The newest version this module reads; it writes 1 unless frames_per_latent > 1."""


class _GuardedFile:
    """The cache's temp file as h5py's `fileobj` driver sees it (seek, tell, read, write, truncate, flush).

    HDF5 does not survive a failed write: h5py then prints an error for every object it releases and HDF5 2.0
    segfaults when the file is closed (`drivesim encode` on a full disk: thousands of lines, exit 139). So the
    first OSError of a write, truncate or flush is kept in `error` and never reaches HDF5; later writes go to
    memory (reads see them), HDF5 finishes normally, and the writer raises and deletes the file.
    """

    def __init__(self, fd: int) -> None:
        self.fd, self.pos, self.size = fd, 0, 0
        self.error: OSError | None = None
        self._overlay: list[tuple[int, bytes]] = []  # writes after the failure, in order

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = self.size if whence == os.SEEK_END else pos if whence == os.SEEK_SET else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self.size - self.pos))
        buf = bytearray(n)
        if self.error is None or n:
            data = os.pread(self.fd, n, self.pos) if n else b""
            buf[: len(data)] = data
        for off, data in self._overlay:
            lo, hi = max(off, self.pos), min(off + len(data), self.pos + n)
            if lo < hi:
                buf[lo - self.pos:hi - self.pos] = data[lo - off:hi - off]
        self.pos += n
        return bytes(buf)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as e:
                self.error = e
        if self.error is not None:
            self._overlay.append((self.pos, bytes(view)))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def truncate(self, size: int) -> int:
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.error = e
        self.size = size
        return size

    def flush(self) -> None:
        pass  # nothing is buffered here; `LatentCacheWriter.close` fsyncs once at the end


class LatentCacheWriter:
    """Writes a latent cache; use as a context manager (an exception discards the temp file).

    Args:
        path: final .h5 path (created only by `close()`).
        encoder_id: `encoder_id(...)` of the encoder producing the latents.
        scale_factor: the autoencoder's latent scale factor (readers multiply latents by it).
        max_boxes: box slots per frame in the stored box arrays.
        dtype: "float16" or "float32" for latents.
        created_by: free text recorded in the root attrs (default: user@host drivesim).
        dataset: source dataset folder recorded in the root attrs.
        frames_per_latent: video frames one latent frame stands for (1: per-frame latents).
        box_reduction: how the boxes of a group of frames became one latent frame's ("none" when frames_per_latent
            is 1; see `drivesim.bbox_conditioning.latent_frames`).

    Raises:
        WriteError: (here, from `add_clip` or `close`) the temp file cannot be created or written (full or
            read-only disk, I/O error); the temp file is removed, `path` is untouched.
    """

    def __init__(self, path: str | Path, encoder_id: str, scale_factor: float = 1.0, max_boxes: int = 16,
                 dtype: str = "float16", created_by: str | None = None, dataset: str = "",
                 frames_per_latent: int = 1, box_reduction: str = "none"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        if frames_per_latent < 1 or (frames_per_latent == 1) != (box_reduction == "none"):
            raise ValueError(f"frames_per_latent {frames_per_latent} with box_reduction {box_reduction!r}: 'none' "
                             "exactly when frames_per_latent is 1")
        self.frames_per_latent = frames_per_latent
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.dtype = np.dtype(dtype)
        self.max_boxes = max_boxes
        # HDF5 prints its error stack unless silenced, and h5py silences only the thread that imported it
        getattr(h5py._errors, "silence_errors", lambda: None)()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise WriteError.from_os(self.path, e) from None
        self._io = _GuardedFile(fd)
        try:
            self.file = h5py.File(self._io, "w")
            if created_by is None:
                created_by = f"drivesim on {getpass.getuser()}@{platform.node()}"
            self.file.attrs.update({"format": FORMAT, "format_version": 1 if frames_per_latent == 1 else 2,
                                    "encoder_id": encoder_id, "scale_factor": float(scale_factor),
                                    "created_by": created_by, "dataset": dataset, "max_boxes": max_boxes})
            if frames_per_latent > 1:
                self.file.attrs.update({"frames_per_latent": frames_per_latent, "box_reduction": box_reduction})
            self.clips = self.file.create_group("clips")
            self._check()
        except BaseException:
            self.abort()
            raise

    def _check(self) -> None:
        """Raise WriteError (after discarding the temp file) if a write of the temp file has failed."""
        if self._io.error is not None:
            err = self._io.error
            self.abort()
            raise WriteError.from_os(self.path, err)

    def add_clip(self, clip_id: str, latents: np.ndarray | torch.Tensor, packed: PackedBoxes, *, night: int,
                 crowdedness: int, fps: float, split: str, width: int, height: int,
                 video_packed: PackedBoxes | None = None, source_frames: int | None = None) -> None:
        """Store one clip. latents: (T, c, h, w) unscaled; packed: its boxes with T frames and max_boxes slots.

        With frames_per_latent > 1 (and only then) `video_packed` holds the boxes of the T * frames_per_latent
        encoded video frames and `source_frames` the clip's length in video frames.

        The clip is flushed to disk before returning, so a full disk is reported at the clip that filled it.
        """
        if (video_packed is None) != (self.frames_per_latent == 1):
            raise ValueError("video_packed: required exactly when frames_per_latent > 1")
        if video_packed is not None and video_packed.boxes.shape[0] != packed.boxes.shape[0] * self.frames_per_latent:
            raise ValueError(f"video_packed has {video_packed.boxes.shape[0]} frames, expected "
                             f"{packed.boxes.shape[0]} x {self.frames_per_latent}")
        if isinstance(latents, torch.Tensor):
            latents = latents.detach().float().cpu().numpy()
        latents = np.asarray(latents)
        if latents.ndim != 4 or latents.shape[0] != packed.boxes.shape[0]:
            raise ValueError(f"latents {latents.shape} must be (T, c, h, w) with T = {packed.boxes.shape[0]}")
        if packed.boxes.shape[1] != self.max_boxes:
            raise ValueError(f"packed boxes have {packed.boxes.shape[1]} slots, cache has max_boxes={self.max_boxes}")
        if clip_id in self.clips:
            raise ValueError(f"clip {clip_id!r} already written")
        g = self.clips.create_group(clip_id)
        g.create_dataset("latents", data=latents.astype(self.dtype), chunks=latents.shape)
        for name, arr in (("boxes", packed.boxes), ("classes", packed.classes), ("box_mask", packed.box_mask),
                          ("track_ids", packed.track_ids)):
            g.create_dataset(name, data=arr)
        g.attrs.update({"night": int(night), "crowdedness": int(crowdedness), "fps": float(fps), "split": split,
                        "width": int(width), "height": int(height)})
        if video_packed is not None:
            for name in PackedBoxes._fields:
                g.create_dataset(f"video_{name}", data=getattr(video_packed, name))
            g.attrs.update({"num_video_frames": int(video_packed.boxes.shape[0]),
                            "source_frames": int(source_frames if source_frames is not None
                                                 else video_packed.boxes.shape[0])})
        self.file.flush()
        self._check()

    def close(self) -> Path:
        """Flush and atomically move the finished cache to `path`."""
        self.file.close()
        self._check()
        try:
            os.fsync(self._io.fd)
            os.close(self._io.fd)
            self._io.fd = -1
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise WriteError.from_os(self.path, e) from None
        return self.path

    def abort(self) -> None:
        """Discard everything written (the temp file is removed; `path` is untouched)."""
        try:
            if getattr(self, "file", None) is not None:
                self.file.close()
        except (OSError, RuntimeError):
            pass  # the file is deleted below; what HDF5 could not finish does not matter
        finally:
            if self._io.fd >= 0:
                os.close(self._io.fd)
                self._io.fd = -1
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> LatentCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@torch.no_grad()
def write_cache(dataset_root: str | Path, encode_fn: Callable[[torch.Tensor], torch.Tensor], out: str | Path,
                encoder_id: str, batch_frames: int = 16, scale_factor: float = 1.0, max_boxes: int = 16,
                size: tuple[int, int] | None = None, dtype: str = "float16", splits: tuple[str, ...] = ("train", "val"),
                created_by: str | None = None, frames_per_latent: int = 1, box_reduction: str = "union") -> Path:
    """Encode every clip of a clip-format dataset into a latent cache.

    Args:
        dataset_root: clip-format folder.
        encode_fn: maps frames (t, 3, h, w) float32 in [-1, 1] to UNSCALED latents (t / frames_per_latent, 4, h/8,
            w/8) (the autoencoder's posterior mean or a sample); called with at most `batch_frames` frames at a
            time, or, when frames_per_latent > 1, once per clip with all its frames (a 3D encoder sees the whole
            clip, so its latents do not depend on where a batch was cut).
        out: the .h5 file to create (replaced atomically if it exists).
        encoder_id: identity of the encoder (`encoder_id(config, weights_digest)`).
        scale_factor: the autoencoder's scale factor, recorded for readers.
        size: (h, w) to resize frames to before encoding, or None for the video size.
        frames_per_latent: video frames one latent frame stands for (4 for LVDM's 3D autoencoder). A clip's
            first floor(T / f) * f frames are encoded (at most f - 1 are left out at its end).
        box_reduction: with frames_per_latent > 1, how a group's boxes become one latent frame's (one of
            `drivesim.bbox_conditioning.latent_frames.BOX_REDUCTIONS`); the per-frame boxes are stored too.

    Returns:
        the cache path.

    Raises:
        DataError: any invalid clip, or one shorter than frames_per_latent (nothing is written then).
    """
    f = frames_per_latent
    if f > 1 and box_reduction not in BOX_REDUCTIONS:
        raise ValueError(f"box_reduction {box_reduction!r} not in {BOX_REDUCTIONS}")
    manifest = read_manifest(dataset_root)
    with LatentCacheWriter(out, encoder_id, scale_factor, max_boxes, dtype, created_by,
                           dataset=str(Path(dataset_root).resolve()), frames_per_latent=f,
                           box_reduction=box_reduction if f > 1 else "none") as writer:
        for entry in manifest.clips:
            if entry.split not in splits:
                continue
            frames, ann = load_clip(entry)
            if size is not None:
                frames = resize_frames(frames, size)
            x = frames_to_tensor(frames)
            h, w = x.shape[-2:]
            extra = {}
            if f == 1:
                z = torch.cat([encode_fn(x[i:i + batch_frames]).float().cpu() for i in range(0, len(x), batch_frames)])
                packed = pack_annotation(ann, max_boxes)
            else:
                n = len(x) // f * f
                if n == 0:
                    raise DataError(f"{entry.video}: {len(x)} frames; a latent frame of this autoencoder stands "
                                    f"for {f}")
                z = encode_fn(x[:n]).float().cpu()
                packed = pack_latent_boxes(ann, f, max_boxes, box_reduction)
                video = pack_annotation(ann, max_boxes)
                extra = {"video_packed": PackedBoxes(*(a[:n] for a in video)), "source_frames": len(x)}
            if z.shape[0] != len(x) // f or z.shape[-2:] != (h // 8, w // 8):
                raise ValueError(f"encode_fn returned {tuple(z.shape)} for frames {tuple(x.shape)}; expected "
                                 f"({len(x) // f}, c, {h // 8}, {w // 8})")
            writer.add_clip(ann.clip_id, z, packed, night=ann.night, crowdedness=ann.crowdedness, fps=ann.fps,
                            split=entry.split, width=w, height=h, **extra)
    return Path(out)


def pack_latent_boxes(annotation: ClipAnnotation | Scenario, frames_per_latent: int, max_boxes: int,
                      reduction: str = "union") -> PackedBoxes:
    """One box list per latent frame of a clip: its first floor(T / f) * f frames' boxes reduced per group of f
    (`drivesim.bbox_conditioning.latent_frames.group_boxes`), then packed as `pack_annotation` packs frames.

    The one reduction of both the cache and the rollout on 3D latents (`drivesim.pipeline.rollout`), which passes a
    `Scenario` (the same frames / width / height fields and track-id scheme as a `ClipAnnotation`).

    Returns:
        PackedBoxes with T // f frames (boxes (T // f, n, 4) normalised xyxy, classes, box_mask, track_ids as
        `pack_annotation`'s: the same track ids).
    """
    frames = box_tuples(annotation)
    groups = group_boxes(frames[:len(frames) // frames_per_latent * frames_per_latent], frames_per_latent, reduction)
    return pack_boxes(groups, annotation.width, annotation.height, max_boxes)


class LatentCache:
    """Read-only view of a latent cache.

    Attributes: encoder_id, scale_factor, max_boxes, created_by, frames_per_latent (1 unless a latent frame stands
    for several video frames), box_reduction, and `meta` per clip (its attrs + num_frames = LATENT frames).

    Args:
        path: the .h5 file.
        expected_encoder_id: when given, a cache written by another encoder is refused.

    Raises:
        DataError: missing, truncated or corrupt file; wrong format; newer format version; stale cache
            (encoder_id mismatch); missing clip fields. Messages name the file and the field.
    """

    REQUIRED = ("latents", "boxes", "classes", "box_mask", "track_ids")

    def __init__(self, path: str | Path, expected_encoder_id: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: latent cache: file not found")
        self._file: h5py.File | None = None
        self._pid = -1
        f = self.file
        attrs = dict(f.attrs)
        if attrs.get("format") != FORMAT:
            raise DataError(f"{self.path}: format: expected {FORMAT!r}, got {attrs.get('format')!r}")
        version = int(attrs.get("format_version", -1))
        if not 1 <= version <= FORMAT_VERSION:
            raise DataError(f"{self.path}: format_version: {version} is not supported (this drivesim reads "
                            f"1..{FORMAT_VERSION})")
        self.encoder_id = str(attrs.get("encoder_id", ""))
        if expected_encoder_id is not None and self.encoder_id != expected_encoder_id:
            raise DataError(f"{self.path}: encoder_id: cache was written by encoder {self.encoder_id[:16]}..., "
                            f"expected {expected_encoder_id[:16]}... (stale cache: the autoencoder changed; "
                            f"rebuild it)")
        self.scale_factor = float(attrs.get("scale_factor", 1.0))
        self.max_boxes = int(attrs.get("max_boxes", 0))
        self.created_by = str(attrs.get("created_by", ""))
        # video frames per latent frame (4: LVDM's 3D autoencoder) and how its boxes were reduced ("none" for 1)
        self.frames_per_latent = int(attrs.get("frames_per_latent", 1))
        self.box_reduction = str(attrs.get("box_reduction", "none"))
        self.meta: dict[str, dict[str, Any]] = {}
        try:
            clips = f["clips"]
            for cid in clips:
                g = clips[cid]
                for name in self.REQUIRED:
                    if name not in g:
                        raise DataError(f"{self.path}: clips/{cid}/{name}: missing")
                self.meta[cid] = {**{k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()},
                                  "num_frames": g["latents"].shape[0], "latent_shape": g["latents"].shape[1:]}
        except DataError:
            raise
        except (KeyError, OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: clips: cannot read ({type(e).__name__}: {e})") from None

    @property
    def file(self) -> h5py.File:
        # h5py handles must not cross a fork: DataLoader workers reopen the file in their own process.
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise DataError(f"{self.path}: hdf5: cannot open (truncated or corrupt file? {e})") from None
            self._pid = os.getpid()
        return self._file

    def clip_ids(self, split: str | None = None) -> list[str]:
        return [c for c, m in self.meta.items() if split is None or m.get("split") == split]

    def read_clip(self, clip_id: str) -> dict[str, np.ndarray]:
        """Arrays of one clip: latents (T, c, h, w) float32 unscaled, boxes, classes, box_mask, track_ids."""
        try:
            g = self.file["clips"][clip_id]
            out = {name: g[name][()] for name in self.REQUIRED}
        except (KeyError, OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: clips/{clip_id}: cannot read ({type(e).__name__}: {e})") from None
        out["latents"] = out["latents"].astype(np.float32)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, -1
        return state


class LatentClipDataset(Dataset):
    """Windows of cached latents, the latent twin of `ClipDataset` (same windows, same keys).

    Args:
        cache: a `LatentCache` or a path to one.
        split: "train" or "val".
        num_frames, frame_stride: window definition, as in `ClipDataset`.
        scaled: multiply latents by the cache's scale_factor (what diffusion models train on).
        cache_clips: clips kept in memory (LRU); None keeps all.

    Items: "latents" (t, 4, h, w) float32; "boxes", "classes", "box_mask", "track_ids", "night", "crowdedness",
    "clip_id", "start" as in `ClipDataset`.
    """

    def __init__(self, cache: LatentCache | str | Path, split: str = "train", num_frames: int = 8,
                 frame_stride: int = 1, scaled: bool = True, cache_clips: int | None = None):
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.clip_ids = self.cache.clip_ids(split)
        if not self.clip_ids:
            raise DataError(f"{self.cache.path}: clips: no clips in split {split!r}")
        self.num_frames, self.frame_stride, self.scaled = num_frames, frame_stride, scaled
        self.windows = enumerate_windows([self.cache.meta[c]["num_frames"] for c in self.clip_ids], num_frames,
                                         frame_stride)
        if not self.windows:
            raise DataError(f"{self.cache.path}: clips: no clip in split {split!r} has "
                            f"{(num_frames - 1) * frame_stride + 1} frames")
        self.cache_clips = cache_clips
        self._lru: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.windows)

    def _clip(self, i: int) -> dict[str, np.ndarray]:
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        arrays = self.cache.read_clip(self.clip_ids[i])
        if self.scaled:
            arrays["latents"] *= self.cache.scale_factor
        self._lru[i] = arrays
        if self.cache_clips is not None:
            while len(self._lru) > self.cache_clips:
                self._lru.popitem(last=False)
        return arrays

    def __getitem__(self, index: int) -> dict:
        clip, start = self.windows[index]
        a, meta = self._clip(clip), self.cache.meta[self.clip_ids[clip]]
        idx = start + self.frame_stride * np.arange(self.num_frames)
        return {
            "latents": torch.from_numpy(a["latents"][idx]),
            "boxes": torch.from_numpy(a["boxes"][idx]),
            "classes": torch.from_numpy(a["classes"][idx]),
            "box_mask": torch.from_numpy(a["box_mask"][idx]),
            "track_ids": torch.from_numpy(a["track_ids"][idx]),
            "night": torch.tensor(int(meta["night"]), dtype=torch.int64),
            "crowdedness": torch.tensor(int(meta["crowdedness"]), dtype=torch.int64),
            "clip_id": self.clip_ids[clip],
            "start": start,
        }
