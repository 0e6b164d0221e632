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


def end_processes() -> None:
    """The last step of a multi-process run: every rank arrives, then the process group is torn down once.

    Without the barrier a rank that is done (say, while the main process still saves) would tear
    its side of the group down and exit, and a rank still inside a collective or the group's own
    teardown could wait for it forever. No effect in a single process or once the group is gone.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
