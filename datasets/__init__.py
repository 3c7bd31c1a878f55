"""Datasets: the drivesim clip format, MetaDrive generator, nuScenes adapter, latent cache."""
