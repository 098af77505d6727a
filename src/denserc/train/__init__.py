"""Self-distillation training: config, trainer, distributed set-up, checkpoints and metrics."""
from .config import Config, ConfigError, available_configs, load_config
from .distributed import DistributedEnv, setup_distributed
from .trainer import DistillationModule, Trainer, resume_checkpoint, train

__all__ = ["Config", "ConfigError", "DistillationModule", "DistributedEnv", "Trainer", "available_configs",
           "load_config", "resume_checkpoint", "setup_distributed", "train"]
