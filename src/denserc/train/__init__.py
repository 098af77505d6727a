"""Training: the task-agnostic engine, self-distillation on it, configs, distributed set-up, checkpoints, metrics."""
from .checkpoint import resume_checkpoint
from .config import Config, ConfigError, available_configs, load_config
from .distributed import DistributedEnv, setup_distributed
from .engine import Engine, Task
from .trainer import DistillationModule, DistillationTask, Trainer, train

__all__ = ["Config", "ConfigError", "DistillationModule", "DistillationTask", "DistributedEnv", "Engine", "Task",
           "Trainer", "available_configs", "load_config", "resume_checkpoint", "setup_distributed", "train"]
