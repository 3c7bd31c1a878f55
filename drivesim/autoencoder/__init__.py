"""KL-f8 autoencoder, its video-fine-tuned decoder, latent scale factor and (optional) LPIPS loss."""

from drivesim.autoencoder.model import (
    AutoencoderKL,
    Decoder,
    DiagonalGaussian,
    Encoder,
    VideoAutoencoder,
    VideoDecoder,
    check_frames,
    chunk_windows,
    compute_scale_factor,
)

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "VideoAutoencoder",
    "VideoDecoder",
    "check_frames",
    "chunk_windows",
    "compute_scale_factor",
]
