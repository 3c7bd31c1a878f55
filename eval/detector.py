"""The reference box detector of the box-fidelity evaluation: a small anchor-free CenterNet trained on real clips.

Box fidelity is measured the way layout-to-image work measures it (GLIGEN / LayoutDiffusion "YOLO score", Ctrl-V's
YOLOv8 mAP, MagicDrive's BEVFusion mAP): a detector trained on REAL frames runs on generated frames, and its AP is
computed against the boxes that conditioned them. No pretrained detector can be loaded here (no weights may be
downloaded), so drivesim trains its own on a clip-format dataset's train split.

Model (CenterNet, Zhou et al. 2019, "Objects as Points", Sec. 3): a conv encoder to stride 16 and a decoder with skip
connections back to stride `output_stride` (4), then three heads on that grid:
- heatmap (num_classes channels): one Gaussian peak per object centre, trained with CenterNet's penalty-reduced
  focal loss (eq. 1, alpha = 2, beta = 4); the Gaussian is elliptical with sigma = `gaussian_alpha` * (w, h) / 6 in
  grid cells (TTFNet, Liu et al. 2020), which keeps small boxes sharp;
- size (2): log of the box width and height in pixels, L1 at the centre cells (log: sizes span 3-100 pixels);
- offset (2): the sub-cell position of the centre, L1 at the centre cells (eq. 2).
Decoding (Sec. 4): peaks = cells equal to their 3x3 max-pool, top `max_detections` over classes and cells.

Registered as `box_detector`, so it trains through the shared loop (`drivesim eval train-detector`), checkpoints and
resumes like every model, and loads with `drivesim.training.checkpoint.load_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from drivesim.bbox_conditioning.classes import CLASS_NAMES
from einops import rearrange
from torch import nn

from drivesim.errors import ConfigError, DataError
from drivesim.nn.blocks import Downsample, GroupNorm32, ResBlock, Upsample
from drivesim.registry import register_model

__all__ = ["BoxDetector", "DetectorConfig", "Detections"]

MAX_BOXES = 64  # box slots per training frame; a frame with more keeps its largest boxes


@dataclass(frozen=True)
class DetectorConfig:
    """CenterNet-style detector (see the module docstring)."""

    num_classes: int = len(CLASS_NAMES)
    # (h, w) the detector sees: frames of any other size are resized to it and their boxes scaled with them, so
    # pixel sizes (the AP size buckets) are at this resolution
    resolution: tuple[int, int] = (128, 256)
    base_channels: int = 16
    # encoder levels: stride 1, 2, 4, 8, 16 with these channel multipliers of base_channels
    channel_mult: tuple[int, ...] = (1, 1, 2, 4, 4)
    output_stride: int = 4  # heads run at 1/4 of the frame size (CenterNet's)
    gaussian_alpha: float = 0.54  # TTFNet's
    size_weight: float = 0.1  # CenterNet's lambda_size
    offset_weight: float = 1.0  # CenterNet's lambda_off
    max_detections: int = 100  # COCO's maxDets


class Detections(tuple):
    """Per-frame detections: `(boxes (N, K, 4) float32 pixels xyxy, scores (N, K) float32 in [0, 1], classes (N, K)
    int64)`, sorted by score within each frame; K = `max_detections` (cells beyond the frame's peaks carry low
    scores, not padding)."""


def _check_config(cfg: DetectorConfig) -> None:
    levels = len(cfg.channel_mult)
    if cfg.output_stride not in [2 ** i for i in range(levels)]:
        raise ConfigError(f"detector.output_stride: {cfg.output_stride} must be a power of 2 below "
                          f"2**{levels - 1} (the encoder's depth)")
    if cfg.num_classes < 1 or cfg.max_detections < 1:
        raise ConfigError("detector.num_classes / max_detections: must be >= 1")


@register_model("box_detector", DetectorConfig)
class BoxDetector(nn.Module):
    """CenterNet on frames; `loss(batch)` for the shared training loop, `detect(frames)` for evaluation."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        ch = [config.base_channels * m for m in config.channel_mult]
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        for i, c in enumerate(ch):
            self.enc.append(ResBlock(ch[i - 1] if i else ch[0], c))
            self.down.append(Downsample(c) if i < len(ch) - 1 else nn.Identity())
        self.mid = ResBlock(ch[-1], ch[-1])
        # decoder: from the deepest level up to the output stride, adding the encoder feature of each level
        self.out_level = int(math.log2(config.output_stride))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(self.out_level, len(ch) - 1)):
            self.up.append(Upsample(ch[i + 1]))
            self.dec.append(ResBlock(ch[i + 1] + ch[i], ch[i]))
        head_in = ch[self.out_level]
        self.norm = GroupNorm32(head_in)

        def head(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(head_in, head_in, 3, padding=1), nn.SiLU(), nn.Conv2d(head_in, out, 1))

        self.heatmap = head(config.num_classes)
        self.size = head(2)
        self.offset = head(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # CenterNet: initial peak probability 0.1

    # --------------------------------------------------------------------------------------------------- network
    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frames (N, 3, H, W) float in [-1, 1], H and W multiples of 2**(levels - 1) ->
        heatmap logits (N, num_classes, H/s, W/s), log size in pixels (N, 2, H/s, W/s) as (log w, log h),
        centre offset in cells (N, 2, H/s, W/s) as (dx, dy); s = output_stride."""
        h = self.stem(frames)
        skips = []
        for block, down in zip(self.enc, self.down, strict=True):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.mid(h)
        for k, (up, block) in enumerate(zip(self.up, self.dec, strict=True)):
            level = len(skips) - 2 - k
            h = block(torch.cat([up(h), skips[level]], dim=1))
        h = F.silu(self.norm(h))
        return self.heatmap(h), self.size(h), self.offset(h)

    # --------------------------------------------------------------------------------------------------- training
    def targets(self, boxes: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor, height: int, width: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """CenterNet training targets on the output grid of (height, width) frames.

        Args:
            boxes: (N, n, 4) float normalised xyxy; classes: (N, n) int64; mask: (N, n) bool.

        Returns:
            heat (N, num_classes, h, w) in [0, 1] (1 exactly at centre cells); centre cell index (N, n) int64 into
            h * w; log size target (N, n, 2); offset target (N, n, 2); valid (N, n) bool (mask and positive size).
        """
        s = self.config.output_stride
        gh, gw = height // s, width // s
        px = boxes * boxes.new_tensor([width, height, width, height])
        wh = (px[..., 2:] - px[..., :2])
        valid = mask & (wh > 0).all(-1)
        centre = (px[..., :2] + px[..., 2:]) / 2 / s  # in cells
        cell = centre.floor().clamp_min(0)
        cell = torch.stack([cell[..., 0].clamp_max(gw - 1), cell[..., 1].clamp_max(gh - 1)], -1)
        offset = centre - cell
        sigma = (self.config.gaussian_alpha * wh / s / 6).clamp_min(0.5)  # (N, n, 2) in cells
        xs = torch.arange(gw, device=boxes.device, dtype=boxes.dtype)
        ys = torch.arange(gh, device=boxes.device, dtype=boxes.dtype)
        gx = ((xs - cell[..., 0:1]) / sigma[..., 0:1]).pow(2)  # (N, n, w)
        gy = ((ys - cell[..., 1:2]) / sigma[..., 1:2]).pow(2)  # (N, n, h)
        g = torch.exp(-0.5 * (gy[..., :, None] + gx[..., None, :])) * valid[..., None, None]  # (N, n, h, w)
        onehot = F.one_hot(classes.clamp(0, self.config.num_classes - 1), self.config.num_classes).to(g.dtype)
        heat = (onehot[..., None, None] * g[:, :, None]).amax(dim=1) if g.shape[1] else \
            g.new_zeros(g.shape[0], self.config.num_classes, gh, gw)
        index = (cell[..., 1] * gw + cell[..., 0]).long()
        return heat, index, wh.clamp_min(1e-3).log(), offset, valid

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss (engine protocol): focal heatmap loss + size_weight * L1(log size) + offset_weight *
        L1(offset), the L1 terms averaged over real boxes (CenterNet eq. 1-3).

        Args:
            batch: "frames" (b, t, 3, H, W) in [-1, 1], "boxes" (b, t, n, 4) normalised xyxy, "classes" (b, t, n),
                "box_mask" (b, t, n) (the layout of `drivesim.datasets.torch_data.FrameDataset`).

        Raises:
            DataError: frames whose size is not a multiple of the encoder's total stride.
        """
        frames = rearrange(batch["frames"], "b t c h w -> (b t) c h w")
        boxes = rearrange(batch["boxes"], "b t n k -> (b t) n k")
        classes = rearrange(batch["classes"], "b t n -> (b t) n")
        mask = rearrange(batch["box_mask"], "b t n -> (b t) n")
        self._check_size(frames)
        heat_logits, log_size, offset = self(frames)
        heat, index, size_t, offset_t, valid = self.targets(boxes, classes, mask, frames.shape[-2], frames.shape[-1])
        focal = focal_loss(heat_logits, heat)
        size_p = _gather(log_size, index)
        off_p = _gather(offset, index)
        n_valid = valid.sum().clamp_min(1)
        w = valid[..., None].to(size_p.dtype)
        size_l = ((size_p - size_t).abs() * w).sum() / (2 * n_valid)
        off_l = ((off_p - offset_t).abs() * w).sum() / (2 * n_valid)
        total = focal + self.config.size_weight * size_l + self.config.offset_weight * off_l
        return total, {"focal": focal.item(), "size": size_l.item(), "offset": off_l.item(), "loss": total.item()}

    def _check_size(self, frames: torch.Tensor) -> None:
        total = 2 ** (len(self.config.channel_mult) - 1)
        if frames.shape[-2] % total or frames.shape[-1] % total:
            raise DataError(f"detector: frames of {frames.shape[-2]}x{frames.shape[-1]} pixels; height and width "
                            f"must be multiples of {total}")

    # --------------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, frames: torch.Tensor, batch_size: int = 32) -> Detections:
        """Detections on frames (N, 3, H, W) float in [-1, 1] (see `Detections`), in the frames' pixels.

        Raises:
            DataError: frames whose size is not a multiple of the encoder's total stride.
        """
        self._check_size(frames)
        s, k = self.config.output_stride, self.config.max_detections
        out_boxes, out_scores, out_classes = [], [], []
        for i in range(0, frames.shape[0], batch_size):
            heat_logits, log_size, offset = self(frames[i:i + batch_size])
            heat = heat_logits.sigmoid()
            peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
            n, c, gh, gw = peaks.shape
            scores, flat = peaks.reshape(n, -1).topk(min(k, c * gh * gw), dim=1)
            cls, cell = flat // (gh * gw), flat % (gh * gw)
            wh = _gather(log_size, cell).exp()
            off = _gather(offset, cell)
            cx = ((cell % gw).to(wh.dtype) + off[..., 0]) * s
            cy = ((cell // gw).to(wh.dtype) + off[..., 1]) * s
            out_boxes.append(torch.stack([cx - wh[..., 0] / 2, cy - wh[..., 1] / 2,
                                          cx + wh[..., 0] / 2, cy + wh[..., 1] / 2], -1))
            out_scores.append(scores)
            out_classes.append(cls)
        return Detections((torch.cat(out_boxes).float(), torch.cat(out_scores).float(), torch.cat(out_classes)))


def _gather(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """maps (N, c, h, w), index (N, n) into h * w -> (N, n, c)."""
    flat = rearrange(maps, "n c h w -> n (h w) c")
    return torch.gather(flat, 1, index[..., None].expand(-1, -1, flat.shape[-1]))


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (Zhou et al. 2019, eq. 1; alpha = 2, beta = 4), summed and
    divided by the number of centre cells (heat == 1). logits, heat: (N, c, h, w)."""
    pos = heat.ge(1.0).to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_1p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_l = (1 - p).pow(2) * log_p * pos
    neg_l = (1 - heat).pow(4) * p.pow(2) * log_1p * (1 - pos)
    return -(pos_l.sum() + neg_l.sum()) / pos.sum().clamp_min(1.0)


def default_train_config():
    """The detector's training recipe: AdamW lr 1e-3 (from scratch, group-normalised), 50 warmup steps then cosine,
    batch 16 frames, no EMA; 1200 steps = 12.5 epochs of the committed sample's 1,536 train frames."""
    from drivesim.configs import TrainConfig

    return TrainConfig(max_steps=1200, batch_size=16, lr=1e-3, warmup_steps=50, lr_schedule="cosine",
                       ema_decay=0.0, checkpoint_every=200, log_every=20, tracker=None)


def train_detector(data, out_dir, config: DetectorConfig | None = None, train_config=None, *, resume: bool = True,
                   progress: bool = True, hflip_p: float = 0.5):
    """Train the reference detector on the train split of the clip-format dataset `data` through the shared loop
    (checkpoints under `out_dir/checkpoints`, resumable, exported to `out_dir/model`).

    Frames are resized to `config.resolution`; boxes (up to `MAX_BOXES` per frame) follow; mirrored with probability
    `hflip_p`.

    Returns:
        `drivesim.training.loop.TrainResult`.

    Raises:
        DataError: a bad dataset or an empty train split; ConfigError / CheckpointError as `train`.
    """
    from drivesim.datasets.torch_data import FrameDataset

    config = config or DetectorConfig()
    dataset = FrameDataset(data, "train", size=tuple(config.resolution), max_boxes=MAX_BOXES, hflip_p=hflip_p)
    return fit_detector(dataset, out_dir, config, train_config, resume=resume, progress=progress)


def fit_detector(dataset, out_dir, config: DetectorConfig | None = None, train_config=None, *, resume: bool = True,
                 progress: bool = True):
    """Train a fresh `BoxDetector` (initialised from `train_config.seed`) on `dataset` (items in the layout of
    `drivesim.datasets.torch_data.FrameDataset`, frames at `config.resolution`) through the shared loop, in the run
    folder `out_dir` (resumed from its latest checkpoint when `resume`).

    Returns:
        `drivesim.training.loop.TrainResult`.

    Raises:
        ConfigError / CheckpointError / DataError: as `drivesim.training.loop.train`.
    """
    import torch

    from drivesim.training.loop import train

    config = config or DetectorConfig()
    train_config = train_config or default_train_config()
    torch.manual_seed(train_config.seed)
    model = BoxDetector(config)
    return train(model, dataset, train_config, out_dir, resume=resume, progress=progress)
