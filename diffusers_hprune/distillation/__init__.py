"""Stage 2 of the method (DESIGN.md section 6, steps 5-7): recover the pruned student from the teacher.

* :mod:`.pwp` - Positional Weight Preservation: freeze what runs before the first pruned location.
* :mod:`.sgdistill` - Sensitivity-Guided Distillation: one optimizer group per trainable
  component with learning rate ``lr * m(i, c)``.
* :mod:`.loss` - ``L = L_KD + lambda_feat * L_feat``, pairing student and teacher blocks by
  their original index.
"""

from diffusers_hprune.distillation.loss import BlockFeatures, distillation_loss
from diffusers_hprune.distillation.pwp import PWPResult, apply_pwp, first_pruned_block
from diffusers_hprune.distillation.sgdistill import ParamGroup, sensitivity_multipliers, sgdistill_param_groups

__all__ = [
    "BlockFeatures",
    "PWPResult",
    "ParamGroup",
    "apply_pwp",
    "distillation_loss",
    "first_pruned_block",
    "sensitivity_multipliers",
    "sgdistill_param_groups",
]
