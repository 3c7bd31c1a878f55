"""Parameter counts of every model of every preset (the README's preset table), built on the meta device.

    python benchmarks/presets.py [--out presets]

Counts all parameters of each model class as `drivesim.load` rebuilds it (including a discriminator the class
owns; the video models include their frozen spatial layers). The video autoencoder is the preset's autoencoder
with `video_decoder` on.
Writes benchmarks/results/<out>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from _common import write_result


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters) of `model`."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="presets", help="result name under benchmarks/results/")
    args = ap.parse_args(argv)

    from drivesim.configs import PRESETS, get_preset
    from drivesim.registry import get_model_class

    models = {"autoencoder": ("autoencoder_kl", "autoencoder"), "video_autoencoder": ("video_autoencoder",
              "autoencoder"), "image_ldm": ("image_ldm", "image_ldm"), "prediction": ("prediction_ldm", "prediction"),
              "interpolation": ("interpolation_ldm", "interpolation"), "upsampler": ("video_upsampler", "upsampler")}
    result: dict = {}
    for name in PRESETS:
        preset = get_preset(name)
        row = {"resolution": list(preset.resolution)}
        with torch.device("meta"):
            for key, (cls_name, field) in models.items():
                cfg = getattr(preset, field)
                if cls_name == "video_autoencoder":
                    cfg = dataclasses.replace(cfg, video_decoder=True)
                model = get_model_class(cls_name)(cfg)
                total, trainable = count(model)
                row[key] = {"params": total, "trainable": trainable}
                del model
        result[name] = row
    write_result(args.out, result)
    print("| preset | key-frame res | autoencoder | video decoder (+temporal) | image LDM | prediction | "
          "interpolation | upsampler |\n|---|---|---|---|---|---|---|---|")
    for name, row in result.items():
        cells = [f"{row[k]['params'] / 1e6:.2f}M" for k in models]
        print(f"| {name} | {row['resolution'][0]}x{row['resolution'][1]} | " + " | ".join(cells) + " |")
    return result


if __name__ == "__main__":
    main()
