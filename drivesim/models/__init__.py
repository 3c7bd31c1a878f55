"""Importing this package registers every model class with `drivesim.registry` (used by `drivesim.load`)."""

import drivesim.autoencoder  # noqa: F401,E402  (autoencoder_kl, video_autoencoder, video_autoencoder_3d)
from drivesim.models import (
    image_ldm,  # noqa: E402,F401  (image_ldm)
    upsampler,  # noqa: E402,F401  (video_upsampler)
    video_ldm,  # noqa: E402,F401  (prediction_ldm, interpolation_ldm)
)
