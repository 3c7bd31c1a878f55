"""Training-data throughput: windows from the HDF5 latent cache vs frames encoded on the fly by the autoencoder.

    python benchmarks/data_throughput.py [--data data/sample] [--preset cpu-small] [--batch-size 8] [--rounds 5]

Both pipelines feed what the prediction stage trains on (the preset's `prediction.num_frames` key frames every
`prediction.frame_stride` source frames, latents 4 x h/8 x w/8 at the preset's resolution), through a
`torch.utils.data.DataLoader` (shuffled, `num_workers=0`: the machine has 2 cores) into a no-op consumer (the
latents are reduced to one number, so the data really arrives):

- cache: `LatentClipDataset` over a cache written by `write_cache` with the preset's autoencoder encoder
  (posterior mean); each clip is one HDF5 read, then kept in memory (LRU);
- cache_reread: the same with an LRU of one clip, so shuffled samples re-read their clip from the HDF5 file
  (a cache larger than memory; the OS page cache still holds the file);
- on the fly: `ClipDataset` (decoded clips kept in its LRU, resized to the preset's resolution) and the preset's
  autoencoder encoder run on every batch (`encode(frames).sample()`, no grad).

Decoded videos and cached clips are warmed up by one full pass of each pipeline; then `--rounds` rounds time
`--batches` batches of each in turn (same process, alternating), and samples/s is the median over rounds.
The autoencoder has random weights: encoder cost does not depend on them. Without `--data` (or when the folder
has no manifest.json) synthetic clips (`write_synthetic_dataset`) at the preset's resolution are used.
Target: cache >= 5x on the fly. Writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling `_common` module, not the repo root
import _common  # noqa: E402

TARGET_SPEEDUP = 5.0


def _cycle(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> dict:
    from drivesim.datasets.clips import read_manifest, write_synthetic_dataset
    from drivesim.datasets.latent_cache import LatentClipDataset, encoder_id, write_cache
    from drivesim.datasets.torch_data import ClipDataset
    from torch.utils.data import DataLoader

    from drivesim.autoencoder import AutoencoderKL
    from drivesim.configs import get_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/sample"))
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--synthetic-clips", type=int, default=4)
    ap.add_argument("--synthetic-frames", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="data_throughput")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    pcfg = preset.prediction
    size = preset.resolution
    tmp = Path(tempfile.mkdtemp(prefix="drivesim-data-bench-"))
    if (args.data / "manifest.json").is_file():
        root, source = args.data, str(args.data)
    else:
        root = tmp / "clips"
        write_synthetic_dataset(root, clips=args.synthetic_clips, frames=args.synthetic_frames, size=size,
                                splits=("train",) * args.synthetic_clips)
        source = (f"synthetic: {args.synthetic_clips} clips x {args.synthetic_frames} frames at {size[0]}x{size[1]} "
                  f"({args.data} has no manifest.json)")
    torch.manual_seed(0)
    ae = AutoencoderKL(preset.autoencoder).eval()
    fields, digest = ae.encoder_fingerprint()

    @torch.no_grad()
    def encode_mean(x):  # (t, 3, h, w) -> (t, 4, h/8, w/8) raw latents
        return ae.encode(x[None]).mode()[0]

    t0 = time.perf_counter()
    cache_path = write_cache(root, encode_mean, tmp / "latents.h5", encoder_id(fields, digest), size=size,
                             splits=("train",), max_boxes=pcfg.unet.boxes.max_boxes)
    cache_build_s = time.perf_counter() - t0
    num_clips = len(read_manifest(root).split("train"))

    kw = dict(split="train", num_frames=pcfg.num_frames, frame_stride=pcfg.frame_stride)
    cache_ds = LatentClipDataset(cache_path, **kw)
    clip_ds = ClipDataset(root, size=size, max_boxes=pcfg.unet.boxes.max_boxes, **kw)
    g = torch.Generator().manual_seed(0)
    # cache_clips=1 with shuffled windows: (almost) every sample is a fresh HDF5 read of its clip, the path of a
    # cache much larger than memory (the OS page cache still holds the file)
    reread_ds = LatentClipDataset(cache_path, cache_clips=1, **kw)
    loaders = {"cache": DataLoader(cache_ds, batch_size=args.batch_size, shuffle=True, generator=g),
               "cache_reread": DataLoader(reread_ds, batch_size=args.batch_size, shuffle=True, generator=g),
               "on_the_fly": DataLoader(clip_ds, batch_size=args.batch_size, shuffle=True, generator=g)}

    def latents_of(name, batch):
        if name.startswith("cache"):
            return batch["latents"]
        with torch.no_grad():
            return ae.encode(batch["frames"]).sample()

    sink = []  # the no-op consumer: one number per batch

    def warm(name):
        for batch in loaders[name]:
            sink.append(float(latents_of(name, batch).mean()))

    streams = {k: _cycle(v) for k, v in loaders.items()}

    def make_round(name):
        def run():
            n = 0
            for _ in range(args.batches):
                batch = next(streams[name])
                z = latents_of(name, batch)
                sink.append(float(z.mean()))
                n += z.shape[0]
            counts[name].append(n)
        return run

    counts: dict[str, list[int]] = {k: [] for k in loaders}
    for name in loaders:
        warm(name)
    times = _common.alternate({k: make_round(k) for k in loaders}, args.rounds, warmup=0)
    rates = {k: [n / s for n, s in zip(counts[k], times[k], strict=True)] for k in loaders}
    per = {k: {**_common.summary(times[k]), "samples_per_round": counts[k], "samples_per_s": rates[k],
               "median_samples_per_s": statistics.median(rates[k])} for k in loaders}
    speedup = per["cache"]["median_samples_per_s"] / per["on_the_fly"]["median_samples_per_s"]
    speedup_reread = per["cache_reread"]["median_samples_per_s"] / per["on_the_fly"]["median_samples_per_s"]
    z_shape = list(cache_ds[0]["latents"].shape)
    result = {"benchmark": "data_throughput", "machine": _common.machine(), "preset": args.preset,
              "data": source, "clips": num_clips, "windows": len(cache_ds), "batch_size": args.batch_size,
              "sample_latents_shape": z_shape, "cache_build_s": cache_build_s,
              "method": "DataLoader(num_workers=0, shuffle) -> no-op consumer; one warm-up pass each, then "
                        "round-robin rounds; median samples/s",
              "pipelines": per, "speedup_cache_over_on_the_fly": speedup,
              "speedup_cache_reread_over_on_the_fly": speedup_reread,
              "target": f">= {TARGET_SPEEDUP}x (both cache pipelines)",
              "target_met": bool(min(speedup, speedup_reread) >= TARGET_SPEEDUP)}
    m = result["machine"]
    rows = [[k, f"{per[k]['median_samples_per_s']:.1f}", f"{per[k]['median_s'] * 1e3 / args.batches:.1f}"]
            for k in loaders]
    rows.append(["cache / on the fly", f"{speedup:.1f}x", ""])
    rows.append(["cache_reread / on the fly", f"{speedup_reread:.1f}x", ""])
    rows.append([f"target >= {TARGET_SPEEDUP}x", _common.verdict(result["target_met"]), ""])
    _common.table(f"Training data throughput, {args.preset}: samples of {'x'.join(map(str, z_shape))} latents, "
                  f"batch {args.batch_size}, {source}; {m['cpu']}, {m['torch_threads']} threads (shared machine), "
                  f"{m['date_utc']} UTC", ["pipeline", "samples/s (median)", "ms per batch"], rows)
    path = _common.write_result(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
