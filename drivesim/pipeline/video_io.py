"""Reproducible H.264 writing for rollouts: closed mp4 segments and their concatenation.

A resumed rollout must re-create the same bytes as an uninterrupted one, so frames are converted to YUV 4:2:0 in
numpy (not by swscale) and x264 runs single-threaded without look-ahead.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from drivesim.atomic import atomic_path


def _encoder(container, fps: float, width: int, height: int, crf: int):
    # x264's threaded lookahead (mb-tree rate control) gave different bytes for the same frames from run to run on
    # this machine; a resumed rollout must re-create the same video, so: one thread, no mb-tree, no rc lookahead
    # (tested reproducible across concurrent processes; CRF rate control is otherwise unchanged)
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0:rc-lookahead=0"}
    return stream


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (3h/2, w) uint8 planar YUV 4:2:0, BT.601 limited range (what swscale does by default,
    and what decoders assume for untagged H.264), chroma averaged over 2x2 blocks.

    Done in numpy so the encoder input is exactly reproducible (see `_video_frame`).
    """
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, sub(u), sub(v))]
    return np.concatenate([planes[0], planes[1].reshape(h // 4, w), planes[2].reshape(h // 4, w)])


def _video_frame(rgb: np.ndarray | None = None, yuv: np.ndarray | None = None):
    """An av.VideoFrame (yuv420p) of (h, w, 3) RGB or (3h/2, w) planar YUV, whose plane buffers are written by us.

    Every byte of every plane buffer is set (edge pixels replicated into any line padding), so nothing but the
    frame reaches the encoder (part of making segment bytes reproducible, see `_encoder`).
    """
    import av

    if yuv is None:
        yuv = rgb_to_yuv420p(rgb)
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    planes = [yuv[:h], yuv[h:h + h // 4].reshape(h // 2, w // 2), yuv[h + h // 4:].reshape(h // 2, w // 2)]
    frame = av.VideoFrame(w, h, "yuv420p")
    for plane, arr in zip(frame.planes, planes, strict=True):
        ls = plane.line_size
        buf = np.empty((plane.buffer_size // ls, ls), np.uint8)
        buf[:arr.shape[0], :arr.shape[1]] = arr
        buf[:arr.shape[0], arr.shape[1]:] = arr[:, -1:]
        buf[arr.shape[0]:] = buf[arr.shape[0] - 1]
        plane.update(buf.tobytes())
    return frame


def write_segment(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    """Write (t, h, w, 3) uint8 RGB frames as a closed H.264 mp4 (temp file + rename), reproducibly."""
    import av

    with atomic_path(path, suffix=".mp4") as tmp, av.open(str(tmp), mode="w") as container:
        stream = _encoder(container, fps, frames.shape[2], frames.shape[1], crf)
        for frame in frames:
            for packet in stream.encode(_video_frame(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def concat_segments(segments: list[Path], out: Path, fps: float, crf: int) -> int:
    """Decode the segment mp4s frame by frame and encode them into one mp4 (temp file + rename); the decoded YUV
    planes are re-encoded as they are (no colour conversion round trip).

    Memory holds one frame at a time. Returns the number of frames written.
    """
    import av

    count = 0
    with atomic_path(out, suffix=".mp4") as tmp, av.open(str(tmp), mode="w") as container:
        stream = None
        for seg in segments:
            with av.open(str(seg)) as src:
                for frame in src.decode(video=0):
                    if stream is None:
                        stream = _encoder(container, fps, frame.width, frame.height, crf)
                    for packet in stream.encode(_video_frame(yuv=frame.to_ndarray(format="yuv420p"))):
                        container.mux(packet)
                    count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count
