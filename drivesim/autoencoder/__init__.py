"""KL-f8 autoencoder, its video-fine-tuned decoder, LVDM's 3D autoencoder, latent scale factor and (optional) LPIPS
loss."""

from drivesim.autoencoder.autoencoder_3d import VideoAutoencoder3D
from drivesim.autoencoder.model import AutoencoderKL, compute_scale_factor
from drivesim.autoencoder.networks import Decoder, DiagonalGaussian, Encoder, VideoDecoder, check_frames, chunk_windows
from drivesim.autoencoder.video import VideoAutoencoder

__all__ = [
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "VideoAutoencoder",
    "VideoAutoencoder3D",
    "VideoDecoder",
    "check_frames",
    "chunk_windows",
    "compute_scale_factor",
]
