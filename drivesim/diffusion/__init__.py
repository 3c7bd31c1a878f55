"""Diffusion core: schedule adapter over diffusers, `Denoiser` (parameterisation + loss), guidance, sampling."""

from drivesim.diffusion.denoiser import Denoiser
from drivesim.diffusion.guidance import Guidance, GuidanceTerm, drop_conditions, drop_labels_and_boxes
from drivesim.diffusion.sampling import sample
from drivesim.diffusion.schedule import NoiseSchedule, Sampler

__all__ = ["Denoiser", "Guidance", "GuidanceTerm", "NoiseSchedule", "Sampler", "drop_conditions",
           "drop_labels_and_boxes", "sample"]
