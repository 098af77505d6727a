"""Training: the task-agnostic engine, self-distillation on it, configs, distributed set-up, checkpoints, metrics."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "resume_checkpoint": ".checkpoint", "Config": ".config", "ConfigError": ".config", "load_config": ".config",
    "available_configs": ".shipped", "DistributedEnv": "..distributed", "setup_distributed": "..distributed",
    "Engine": ".engine", "Task": ".engine", "DistillationModule": ".trainer", "DistillationTask": ".trainer",
    "Trainer": ".trainer", "train": ".trainer",
})
