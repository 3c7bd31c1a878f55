"""Importing this package registers every model class with `drivesim.registry` (used by `drivesim.load`)."""
