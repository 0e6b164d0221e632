"""Positional Weight Preservation (DESIGN.md section 6, step 5).

Everything that runs before the first pruned location keeps its pretrained weights: the
input embedders and every block before the first removed block or component. The blocks
from that location on and the output layers train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffusers_hprune.architecture import get_family
from diffusers_hprune.distillation.qlora import logical_numel
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import PlanError

#: Below this share of the student's parameters left trainable, the trainer warns that PWP leaves almost nothing to train.
ALMOST_NOTHING = 0.05


def first_pruned_block(plan: PrunePlan) -> int:
    """Index of the first block the plan removes or prunes."""
    touched = set(plan.removed_blocks) | set(plan.removed_components)
    if not touched:
        raise PlanError("The plan removes nothing, so there is no pruned location to preserve weights before.")
    return min(touched)


@dataclass
class PWPResult:
    """What :func:`apply_pwp` froze and what stays trainable (module paths and parameter counts)."""

    first_pruned: int
    frozen_modules: list[str] = field(default_factory=list)
    trainable_modules: list[str] = field(default_factory=list)
    frozen_params: int = 0
    trainable_params: int = 0

    def warning(self) -> str | None:
        """What to tell the user before training when PWP froze nearly everything (less than :data:`ALMOST_NOTHING`
        of the parameters trains: a plan that removes only the last blocks), else None."""
        total = self.frozen_params + self.trainable_params
        if not self.frozen_params or self.trainable_params >= ALMOST_NOTHING * total:
            return None
        blocks = [m for m in self.trainable_modules if m.rsplit(".", 1)[-1].isdigit()]
        return (
            f"warning: PWP leaves {self.trainable_params / total:.1%} of the student trainable "
            f"({self.trainable_params:,} parameters: {', '.join(self.trainable_modules)}), because the plan's first "
            f"pruned location is block {self.first_pruned} and everything before it stays as the teacher had it"
            + ("; no kept block trains" if not blocks else "") + ". Distillation can then recover little of what "
            "the removed blocks did: on the toys such a plan distils better without PWP (docs/distillation.md, "
            "'When PWP leaves almost nothing to train'). Pass --no-pwp (hprune distill; \"pwp\": false in a hprune "
            "compress --config), or choose a plan that removes blocks before the end."
        )

    def summary(self) -> str:
        total = self.frozen_params + self.trainable_params
        return (
            f"PWP: first pruned location is block {self.first_pruned}; frozen {len(self.frozen_modules)} modules "
            f"({self.frozen_params:,} parameters: {', '.join(self.frozen_modules) or 'none'}); trainable "
            f"{len(self.trainable_modules)} modules ({self.trainable_params:,} parameters, "
            f"{self.trainable_params / max(total, 1):.1%}: {', '.join(self.trainable_modules)})"
        )


def apply_pwp(student: nn.Module, enabled: bool = True) -> PWPResult:
    """Set ``requires_grad`` on the pruned ``student``: frozen before its first pruned location (if ``enabled``).

    With ``enabled=False`` every parameter trains (the ``--no-pwp`` ablation); the result
    still lists the modules.
    """
    family = get_family(student)
    plan = student.prune_plan
    first = first_pruned_block(plan)
    specs = family.block_specs(student.config)
    groups: list[tuple[str, bool]] = [(name, True) for name in family.input_modules if hasattr(student, name)]
    groups += [(spec.path, spec.index < first) for spec in specs if spec.index not in plan.removed_blocks]
    groups += [(name, False) for name in family.output_modules if hasattr(student, name)]
    result = PWPResult(first_pruned=first)
    for path, before in groups:
        module = student.get_submodule(path)
        n = sum(logical_numel(p) for p in module.parameters())
        frozen = enabled and before
        for p in module.parameters():
            if p.is_floating_point():  # the packed codes of a QLoRA student's 4-bit layers never train
                p.requires_grad_(not frozen)
        if frozen:
            result.frozen_modules.append(path)
            result.frozen_params += n
        else:
            result.trainable_modules.append(path)
            result.trainable_params += n
    covered = sum(logical_numel(p) for path, _ in groups for p in student.get_submodule(path).parameters())
    if covered != sum(logical_numel(p) for p in student.parameters()):
        raise RuntimeError("PWP did not cover every parameter of the student; the family's module lists are stale.")
    return result
