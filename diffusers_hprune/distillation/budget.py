"""Computed memory of a distillation run per low-memory mode (weights, gradients, optimizer state).

Counts on the meta device from the config and the plan, so it works for SD3.5 Large Turbo and
FLUX.1-schnell without their weights. Activations are NOT included (they depend on resolution,
batch and attention kernels; gradient checkpointing keeps only block inputs): measure them on
the GPU. Per process; with DDP every process holds all of it.

* teacher: bf16 weights, or NF4 (``--teacher_4bit``);
* student, full weights: fp32 master weights, fp32 gradients of the trainable part, AdamW
  state (two fp32 moments) or 8-bit AdamW (two 1-byte moments plus per-block scales);
* student, LoRA: frozen weights in bf16, fp32 adapters of rank ``r`` on every linear layer of
  the trainable modules, with their gradients and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffusers_hprune.families import get_family
from diffusers_hprune.families.inventory import build_on_meta, inspect_transformer
from diffusers_hprune.families.sizes import model_weight_bytes
from diffusers_hprune.plan import PrunePlan


@dataclass
class TrainingMemory:
    mode: str
    teacher: int
    student_weights: int
    trainable_params: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.teacher + self.student_weights + self.gradients + self.optimizer


def _trainable_modules(student: nn.Module, plan: PrunePlan, pwp: bool) -> list[str]:
    family = get_family(student)
    first = min(set(plan.removed_blocks) | set(plan.removed_components))
    paths = [s.path for s in family.block_specs(student.config)
             if s.index not in plan.removed_blocks and (not pwp or s.index >= first)]
    if not pwp:
        paths += [m for m in family.input_modules if hasattr(student, m)]
    return paths + [m for m in family.output_modules if hasattr(student, m)]


def training_memory(config, plan: PrunePlan, *, teacher_4bit: bool = False, lora_rank: int = 0,
                    adam_8bit: bool = False, pwp: bool = True) -> TrainingMemory:
    """Weights, gradients and optimizer bytes of one process for the given mode."""

    inventory = inspect_transformer(config)
    student = build_on_meta(dict(config, prune_plan=plan.to_dict()))
    paths = _trainable_modules(student, plan, pwp)
    if lora_rank:
        trainable = sum(lora_rank * (m.in_features + m.out_features) for path in paths
                        for m in student.get_submodule(path).modules() if isinstance(m, nn.Linear))
        weights = model_weight_bytes(student, "bf16") + 4 * trainable
    else:
        trainable = sum(p.numel() for path in paths for p in student.get_submodule(path).parameters())
        weights = model_weight_bytes(student, "fp32")
    optimizer = (2 * trainable + 2 * 4 * -(-trainable // 2048)) if adam_8bit else 8 * trainable
    mode = ", ".join(filter(None, [f"LoRA r={lora_rank}" if lora_rank else "full weights",
                                   "8-bit AdamW" if adam_8bit else "AdamW",
                                   "NF4 teacher" if teacher_4bit else "bf16 teacher"]))
    return TrainingMemory(mode, inventory.original_bytes["nf4" if teacher_4bit else "bf16"], weights, trainable,
                          4 * trainable, optimizer)
