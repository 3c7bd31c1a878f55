"""Training engine: the shared accelerate loop, EMA, safetensors checkpoints, reproducible data order."""

from drivesim.training.checkpoint import latest_checkpoint, load_model, save_model
from drivesim.training.loop import NonFiniteLossError, TrainResult, train

__all__ = ["train", "TrainResult", "NonFiniteLossError", "save_model", "load_model", "latest_checkpoint"]
