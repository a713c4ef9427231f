"""Training: typed configs, the trainer, checkpoints, the frozen-feature cache, DDP helpers."""

from rsitr.models.checkpoint import load_method, save_method
from rsitr.training.config import TrainConfig, load_config
from rsitr.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config", "load_method", "save_method"]
