"""`hprune distill` under Accelerate's FSDP2 on gloo CPU processes, for tests (not part of the package).

Accelerate selects FSDP for GPU process groups only: on CPU processes an FSDP launch config becomes
plain multi-process CPU training. This script, started by ``accelerate launch --config_file
examples/accelerate_configs/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py distill ...``, turns
that MULTI_CPU state into FSDP with the plugin the launch config describes (its ``FSDP_*``
variables), so Accelerate's own FSDP2 preparation, clipping, checkpointing and state-dict gathering
run through the trainer exactly as on GPUs, with gloo collectives instead of NCCL.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_original = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _original(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* environment variables
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        self.distributed_type = DistributedType.FSDP


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from diffusers_hprune.cli import main

    sys.exit(main(sys.argv[1:]))
