"""Running a task on the engine from a command: output folder, process group, logging, resume, fit, export."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from tqdm.contrib.logging import logging_redirect_tqdm

from ..distributed import DistributedEnv, cleanup_distributed, setup_distributed
from .checkpoint import resume_checkpoint
from .loop import Engine, Task


def run(build_task: Callable[[DistributedEnv], Task], config, config_name: str,
        resume: str | None = None) -> tuple[DistributedEnv, Path]:
    """Train the task ``build_task(env)`` makes, as every ``... train`` command does (distillation, detection,
    CAT-Seg): the output folder (``train.output_dir``, else ``runs/<config name>``), the process group,
    per-rank logging, the checkpoint to resume from (``resume``: None, "auto" or a checkpoint folder),
    ``Engine.fit`` and the export, its progress bars kept apart from log lines. Returns the environment and
    the export folder. The process group is left whatever happens; errors reach the caller (``cli.main``
    prints them)."""
    output_dir = Path(config.train.output_dir or Path("runs") / Path(config_name).name.removesuffix(".yaml"))
    env = setup_distributed(config.train.device)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("denserc").setLevel(logging.INFO if env.is_main else logging.WARNING)
    try:
        with logging_redirect_tqdm():
            checkpoint = resume_checkpoint(output_dir, resume, env)
            return env, Engine(build_task(env), config, env, output_dir).fit(checkpoint)
    finally:
        cleanup_distributed()
