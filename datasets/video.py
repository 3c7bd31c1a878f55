"""Video files of the clip format (PyAV): H.264 yuv420p mp4 written atomically, read whole or frame by frame."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from drivesim.atomic import atomic_path, write_bytes_atomic, write_json_atomic  # noqa: F401  (re-exported)
from drivesim.errors import DataError


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 20) -> None:
    """Write RGB frames as an H.264 (yuv420p) mp4 that browsers play.

    Args:
        path: output file (written to a temp name in the same folder, then renamed).
        frames: (t, h, w, 3) uint8 RGB; h and w must be even (yuv420p).
        fps: frames per second.
        crf: x264 constant rate factor (lower = better quality, bigger file).

    Raises:
        ValueError: wrong dtype/shape or odd size.
        WriteError: the file cannot be written (full or read-only disk); the temp file is removed.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (t, h, w, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {w}x{h}")
    with atomic_path(path, suffix=".mp4") as tmp:  # PyAV's file-system errors are OSErrors: WriteError
        with av.open(str(tmp), mode="w") as container:
            from fractions import Fraction

            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def iter_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Decode a video frame by frame (memory does not grow with its length): yields (h, w, 3) uint8 RGB.

    Raises:
        DataError: missing, unreadable or truncated file, or a frame whose size differs from the first frame's
            (names the file and the frame index).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video: file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: video: no video stream")
            first = None
            for k, frame in enumerate(container.decode(video=0)):
                size = (frame.width, frame.height)
                if first is None:
                    first = size
                elif size != first:  # a stream can switch resolution midway (concatenated recordings)
                    raise DataError(f"{path}: video: frame {k} is {size[0]}x{size[1]} but frame 0 is "
                                    f"{first[0]}x{first[1]} (the frame size changes midway)")
                yield frame.to_ndarray(format="rgb24")
    except DataError:
        raise
    except Exception as e:  # PyAV raises several error types for corrupt/truncated files
        raise DataError(f"{path}: video: cannot decode ({type(e).__name__}: {e})") from None


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video file to RGB frames.

    Returns:
        (t, h, w, 3) uint8 RGB.

    Raises:
        DataError: the file is missing, unreadable, truncated, has no video frames or changes its frame size
            midway (names the file, and the frame).
    """
    frames = list(iter_video_frames(path))
    if not frames:
        raise DataError(f"{path}: video: no decodable frames (empty or truncated file)")
    return np.stack(frames)
