"""The Accelerate configs shipped in examples/ parse as Accelerate configs and say what their names say.

Accelerate sets up FSDP and DeepSpeed on GPUs only. DDP runs with 2 CPU processes in test_distill_run.py and the
option matrix; the trainer under the shipped FSDP2 config runs on 2 gloo processes in test_option_matrix.py (through
tests/fsdp_on_cpu.py); PyTorch's FSDP2 on the pruned student in test_fsdp_cpu.py; DeepSpeed in
benchmarks/gpu_check.py on a GPU machine (docs/combinations.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs"


@pytest.mark.parametrize("name, distributed_type", [("multi_gpu.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                                    ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, distributed_type):
    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == distributed_type
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"
    if distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        # one unit per block class of _no_split_modules; size-based wrapping would shard FLUX's ff.net (a ModuleList)
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # the installed Accelerate knows FSDP2 (1.6 and newer; pyproject's lower bound), as a GPU launch needs
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
        assert plugin.fsdp_version == 2
    if distributed_type == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2
