"""U-Nets: `SpatialUNet` (image backbone); the video U-Net builds on it through `insert_temporal_layers`."""

from drivesim.unet.spatial import LayerSpec, SpatialUNet, UNetBlock, UNetContext, count_parameters

__all__ = ["LayerSpec", "SpatialUNet", "UNetBlock", "UNetContext", "count_parameters"]
