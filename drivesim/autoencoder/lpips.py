"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant, "lin" weights) from a LOCAL weights file.

Optional part of the autoencoder loss (`AutoencoderConfig.lpips_weights`). Nothing is downloaded: no LPIPS or
VGG weights can be fetched on the machines drivesim targets, so every preset leaves LPIPS off. To use it, build
one safetensors file holding
- `features.{i}.weight` / `features.{i}.bias` for the 13 convolutions of torchvision's `vgg16().features`
  (indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28: torchvision's own key names), and
- `lin{k}.model.1.weight` (k = 0..4, shapes (1, C_k, 1, 1)) from the LPIPS repository's `weights/v0.1/vgg.pth`,
and point `lpips_weights` at it. The file is read with safetensors only (never unpickled).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drivesim.errors import WeightsError

__all__ = ["LPIPS"]

# torchvision vgg16 "D" configuration; "M" = 2x2 max pool
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices in features)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between images in [-1, 1]: (N, 3, H, W) x2 -> (N,) (lower = more similar).

    Frozen (`requires_grad=False`); gradients flow to the inputs only.

    Args:
        weights: local safetensors file (see the module docstring for its keys).

    Raises:
        WeightsError: the file is missing, unreadable, or lacks / misshapes a tensor.
    """

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(Path(weights))
        self.requires_grad_(False)

    def _load(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise WeightsError(f"{path}: lpips_weights: file not found (LPIPS weights are never downloaded; see "
                               "drivesim.autoencoder.lpips)")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: lpips_weights: not a readable safetensors file ({e})") from None
        state = {f"features.{k.split('.', 1)[1]}": v for k, v in tensors.items() if k.startswith("features.")}
        for k in range(len(_TAPS)):
            key = f"lin{k}.model.1.weight"
            if key in tensors:
                state[f"lins.{k}.weight"] = tensors[key]
        own = self.state_dict()
        for name, tensor in own.items():
            src = name if not name.startswith("lins.") else f"lin{name.split('.')[1]}.model.1.weight"
            if name not in state:
                raise WeightsError(f"{path}: {src}: missing tensor")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise WeightsError(f"{path}: {src}: shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
        self.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        k = 0
        for i, layer in enumerate(self.features):
            h_x, h_y = layer(h_x), layer(h_y)
            if i in _TAPS:
                fx = h_x / (h_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = h_y / (h_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[k]((fx - fy).pow(2)).mean(dim=(1, 2, 3))
                k += 1
                if k == len(_TAPS):
                    break
        return total
