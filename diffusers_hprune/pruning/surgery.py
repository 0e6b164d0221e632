"""``prune_transformer``: turn a stock SD3/FLUX transformer into its pruned twin."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights

from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.base import refuse_adapters
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import PlanError


def prune_transformer(transformer: torch.nn.Module, plan: PrunePlan | dict) -> torch.nn.Module:
    """Return a ``HierarchicalPruned*Transformer2DModel`` equal to ``transformer`` with ``plan`` applied.

    The result carries the (normalised) plan in ``config.prune_plan``. Removed parts
    hold no parameters and no state-dict keys; kept parameters keep their names and
    original block indices. Kept weights are the SAME tensors as in ``transformer``
    (no copy, no extra memory): pass ``copy.deepcopy(transformer)`` if the original
    must stay independent, e.g. as a distillation teacher.

    Raises:
        UnsupportedModelError: ``transformer`` is not an SD3 or FLUX transformer.
        PlanError: the plan was made for another family or block count, or names a
            component a block does not have; or the transformer holds LoRA adapter layers
            (fuse and unload them first).
    """
    family = get_family(transformer)
    refuse_adapters(transformer, "prune this transformer")
    if getattr(transformer.config, "prune_plan", None) is not None and not transformer.prune_plan.is_empty:
        raise PlanError(
            "This transformer is already pruned "
            f"({transformer.prune_plan.describe()}); prune the original model with the combined plan instead."
        )
    plan = family.check_plan(PrunePlan.from_dict(plan), transformer.config)
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_") and k != "prune_plan"}
    with init_empty_weights():
        pruned = pruned_class_for(family).from_config(config, prune_plan=plan.to_dict())
    state_dict = family.prune_state_dict(transformer.state_dict(), plan, transformer.config)
    pruned.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers are not in the state dict: take them from the original (same device and dtype).
    original_buffers = dict(transformer.named_buffers())
    for name, _ in list(pruned.named_buffers()):
        if name not in state_dict and name in original_buffers:
            module_path, _, buffer_name = name.rpartition(".")
            pruned.get_submodule(module_path).register_buffer(buffer_name, original_buffers[name], persistent=False)
    pruned.train(transformer.training)
    return pruned
