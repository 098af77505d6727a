"""Self-distillation on the engine (``denserc.engine``): its config, its task (student, frozen teacher and VFM,
losses), and the command."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Config": ".config", "load_config": ".config", "DistillationModule": ".trainer", "DistillationTask": ".trainer",
    "Teacher": ".teacher", "VFM": ".vfm", "DistributedEnv": "..distributed", "setup_distributed": "..distributed",
})
