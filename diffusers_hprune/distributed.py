"""Process state for multi-process work through Accelerate (``accelerate launch``)."""

from __future__ import annotations

import os


def launched_on_cpu() -> bool:
    """True when ``accelerate launch`` started several processes on a machine without a GPU.

    Accelerate then needs ``cpu=True`` to set up its gloo process group (MULTI_CPU);
    without it every process would believe it is alone.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """Accelerate's ``PartialState`` for this process (rank, world size, device, barriers)."""
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu())
