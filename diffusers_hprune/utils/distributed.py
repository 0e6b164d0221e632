"""Process state for multi-process work through Accelerate (``accelerate launch``)."""

from __future__ import annotations

import os
from datetime import timedelta

#: The mixed-precision modes the stages run in (Accelerate's names).
PRECISIONS = ("no", "fp16", "bf16")
#: The shortest process-group timeout the stages use: PyTorch's NCCL default (10 minutes) kills a job whose main
#: process works alone longer than that while the others wait at a barrier.
MIN_TIMEOUT = timedelta(minutes=30)
#: What a timeout is sized by where a process draws images alone: seconds per image and denoising step (FLUX.1 at
#: 1024 px takes about 0.4 s on an H100; slower GPUs and larger batches are covered).
DRAW_SECONDS_PER_STEP = 2.0


def full_tensor(tensor):
    """``tensor`` whole: a DTensor (a parameter sharded by FSDP2) gathered from every rank (call it on every rank,
    in the same order); any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def launched_on_cpu() -> bool:
    """True when ``accelerate launch`` started several processes on a machine without a GPU.

    Accelerate then needs ``cpu=True`` to set up its gloo process group (MULTI_CPU);
    without it every process would believe it is alone.
    """
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def resolved_mixed_precision(flag: str | None) -> str:
    """The mixed precision a run uses, in Accelerate's order: the flag, else the launch config's, else ``"no"``.

    ``accelerate launch`` passes its config's ``mixed_precision`` to the processes as
    ``ACCELERATE_MIXED_PRECISION``; an explicit flag overrides it.
    """
    if flag is not None:
        return flag
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"


def launched_with_deepspeed() -> bool:
    """True when ``accelerate launch`` was given a DeepSpeed config (``distributed_type: DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() == "true"


def local_device_index() -> int:
    """The index of this process's GPU: ``LOCAL_RANK`` under ``accelerate launch`` / ``torchrun``, else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def lone_work_timeout(seconds: float) -> timedelta:
    """A process-group timeout that outlasts ``seconds`` of work one process does while the others wait for it.

    Twice the estimate plus 10 minutes, and never less than :data:`MIN_TIMEOUT`.
    """
    return max(MIN_TIMEOUT, timedelta(seconds=2 * max(seconds, 0.0) + 600))


def process_state(timeout: timedelta | None = None):
    """Accelerate's ``PartialState`` for this process (rank, world size, device, barriers).

    ``timeout``: how long a collective or barrier may wait (the process group's timeout), when this
    call sets the group up; default :data:`MIN_TIMEOUT`.
    """
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu(), timeout=timeout or MIN_TIMEOUT)


def from_main_process(compute):
    """``compute()`` on the main process, its (picklable) result handed to every process; plain ``compute()`` in a
    single process. For what only the main process can compute (it alone holds the text encoders)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    value = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


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
