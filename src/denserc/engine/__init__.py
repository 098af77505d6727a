"""The task-agnostic training engine (docs/training.md#how-training-works): the loop with AMP, accumulation, DDP,
exact resume and checkpoints (``loop``, ``checkpoint``, ``sampler``), metrics, the optimiser and schedule, the
configuration every task's config builds on, and ``run``, which every ``... train`` command calls."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Engine": ".loop", "Task": ".loop", "run": ".launch",
    "resume_checkpoint": ".checkpoint", "complete_checkpoints": ".checkpoint",
    "ConfigError": ".config", "OptimConfig": ".config", "TrainConfig": ".config", "load_structured": ".config",
    "dump_config": ".config", "check_training": ".config", "available_configs": ".shipped",
    "read_metrics": ".metrics",
})
