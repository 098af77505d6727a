"""What every command's report shares: its provenance (JSON) and its Markdown table (printed and in docs)."""
from __future__ import annotations

import datetime
import sys
from typing import Sequence

from . import __version__


def provenance(device, precision: str, world_size: int, **settings) -> dict:
    """Where a report comes from: the command line, versions, device, precision, processes, time, ``settings``."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"argv": sys.argv, "denserc_version": __version__, "torch_version": torch.__version__, "device": name,
            "precision": precision, "world_size": world_size, **settings,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    """A Markdown table (cells already formatted), then its notes, each once, after a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    notes = list(dict.fromkeys(notes))
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")
