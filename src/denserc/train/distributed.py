"""The trainer's import path of the process-group helpers; their one home is ``denserc.distributed``."""
from ..distributed import (DistributedEnv, all_reduce, barrier, broadcast_object, cleanup_distributed,
                           gather_objects, setup_distributed)

__all__ = ["DistributedEnv", "all_reduce", "barrier", "broadcast_object", "cleanup_distributed", "gather_objects",
           "setup_distributed"]
