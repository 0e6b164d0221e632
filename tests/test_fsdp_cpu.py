"""FSDP2 on two CPU processes (gloo): the pruned student shards, trains and gathers back into a loadable model.

Accelerate routes FSDP only on GPUs (on a CPU an FSDP config becomes DDP with ``use_cpu: true``,
and no process group at all without it; docs/budget.md), so the trainer's FSDP path cannot run
here. What can: PyTorch's ``fully_shard`` on the CPU, applied to the project's pruned student
as the shipped config wraps it (one unit per kept block, then the root), a few distillation
steps, and the full state dict gathered to rank 0 and loaded into a fresh pruned model, as
``_final_student`` does with what ``accelerator.get_state_dict`` returns.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from helpers import failure_output, free_port, run_process_group

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from diffusers_hprune import toy
    from diffusers_hprune.budget.traces import Shapes, meta_inputs, meta_transformer
    from diffusers_hprune.distillation.loss import BlockFeatures, kept_blocks, loss_terms
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.models import pruned_class_for
    from diffusers_hprune.plan import PrunePlan
    from diffusers_hprune.pruning.surgery import prune_transformer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    teacher = toy.load_pipeline("sd3", torch.float32).transformer.requires_grad_(False).eval()
    plan = PrunePlan.load(sys.argv[1])
    student = prune_transformer(teacher, plan)
    for p in student.parameters():
        p.data = p.data.clone()
    student.requires_grad_(True).train()
    reference = {k: v.clone() for k, v in student.state_dict().items()}
    family = get_family(student)
    for spec in family.block_specs(student.config):
        if spec.index not in plan.removed_blocks:
            fully_shard(student.get_submodule(spec.path), mesh=mesh)
    fully_shard(student, mesh=mesh)
    sharded = sum(p.to_local().numel() < p.numel() for p in student.parameters())
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = get_model_state_dict(student, options=full)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    config = dict(teacher.config)
    shapes = Shapes(2, 32, 32, 8, 10, 2)
    torch.manual_seed(rank)
    kept = kept_blocks(student)
    for step in range(2):
        inputs = {k: torch.randn(v.shape) if isinstance(v, torch.Tensor) else v
                  for k, v in meta_inputs(meta_transformer(config, None, torch.float32), shapes, torch.float32).items()}
        latents = torch.randn(2, 4, 16, 16)
        with torch.no_grad(), BlockFeatures(teacher, kept) as ft:
            v_t = family.denoiser_output(teacher(**inputs, return_dict=False)[0], latents)
        with BlockFeatures(student, kept) as fs:
            v_s = family.denoiser_output(student(**inputs, return_dict=False)[0], latents)
            loss_terms(v_s, v_t, fs.outputs, ft.outputs)["total"].backward()
        optimizer.step()
        optimizer.zero_grad()
    after = get_model_state_dict(student, options=full)
    if rank == 0:
        settings = {k: v for k, v in config.items() if not k.startswith("_")}
        with init_empty_weights():
            final = pruned_class_for(family).from_config(settings, prune_plan=plan.to_dict())
        final.load_state_dict(after, strict=True, assign=True)
        out = final(**inputs, return_dict=False)[0]
        result = {
            "sharded": sharded, "parameters": sum(1 for _ in student.parameters()),
            "same_keys": sorted(before) == sorted(reference) == sorted(after),
            "same_shapes": all(before[k].shape == reference[k].shape for k in reference),
            "gathered_equals_unsharded": all(torch.equal(before[k], reference[k]) for k in reference),
            "trained": any(not torch.equal(after[k], reference[k]) for k in reference),
            "finite": bool(torch.isfinite(out).all()),
        }
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp2_shards_the_pruned_student_and_gathers_a_loadable_state_dict(tmp_path):
    from diffusers_hprune import toy
    from diffusers_hprune.architecture import get_family
    from diffusers_hprune.architecture.inventory import load_transformer_config
    from diffusers_hprune.plan import PrunePlan

    config = load_transformer_config(toy.model_path("sd3"))
    plan = PrunePlan(family="sd3", num_blocks=get_family(config).num_blocks(config), removed_blocks=[3, 4],
                     removed_components={9: ["ff_context"]})
    plan.save(tmp_path / "plan.json")
    (tmp_path / "fsdp_student.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "fsdp_student.py"), str(tmp_path / "plan.json")]
    result = run_process_group(cmd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, failure_output(result.stderr)
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, result.stdout[-2000:]
    found = json.loads(line[-1][len("RESULT "):])
    assert found["sharded"] > found["parameters"] // 2  # most parameters hold half their rows on each rank
    assert found["same_keys"] and found["same_shapes"] and found["gathered_equals_unsharded"]
    assert found["trained"] and found["finite"]
