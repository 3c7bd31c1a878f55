"""Evaluation: I3D and InceptionV3 feature extractors, FVD/FID/KVD, protocols and reports."""
