"""The QLoRA student (``--teacher_4bit --lora_rank R``): the pruned structure over the NF4 teacher's own layers.

Every 4-bit linear layer the plan keeps whole is the teacher's module object itself: the student's
forward and the teacher's read the same packed NF4 weights, and nothing of them is copied. PEFT's
LoRA wraps such a layer in the student's tree only (the teacher's tree keeps the bare layer), so the
adapters never touch the teacher. The teacher's 16-bit parts (the family's embedders, norms and
output layers) are shared tensors, as :func:`~diffusers_hprune.pruning.surgery.prune_transformer`
shares them. A layer the plan slices (a FLUX single block's ``proj_out`` without ``attn`` or ``mlp``)
cannot be a view of packed 4-bit codes: its kept columns are dequantised once into a 16-bit layer of
its own (exactly the values the teacher computes with).
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights

from diffusers_hprune.architecture import get_family
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.errors import PlanError
from diffusers_hprune.utils.nf4_cpu import import_bitsandbytes

#: Config entries of the NF4 teacher that its pruned twin does not take.
_NOT_STRUCTURE = ("prune_plan", "quantization_config")


def dequantized_weight(layer) -> torch.Tensor:
    """The float32 weight of a bitsandbytes 4-bit layer (its own device), or a 16-bit layer's weight as float32."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach().float()
    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, quant_state).float()


def logical_numel(param: torch.Tensor) -> int:
    """The number of weights ``param`` holds: a 4-bit weight's shape, not the count of its packed bytes."""
    state = getattr(param, "quant_state", None)
    return int(state.shape.numel()) if state is not None else param.numel()


def _is_4bit(module) -> bool:
    return isinstance(module, import_bitsandbytes().nn.Linear4bit)


def shared_nf4_student(teacher: torch.nn.Module, plan: PrunePlan | dict, dtype: torch.dtype) -> torch.nn.Module:
    """The pruned twin of the NF4 ``teacher`` whose kept 4-bit layers ARE the teacher's layers (see the module).

    ``dtype``: the weight dtype of the sliced layers' own 16-bit copies. Returns the student (frozen parameters;
    the trainer adds the adapters). Raises PlanError for a plan that does not fit the teacher.
    """
    family = get_family(teacher)
    plan = family.check_plan(PrunePlan.from_dict(plan), teacher.config)
    settings = {k: v for k, v in teacher.config.items() if not k.startswith("_") and k not in _NOT_STRUCTURE}
    with init_empty_weights():
        student = pruned_class_for(family).from_config(settings, prune_plan=plan.to_dict())
    sliced = family.sliced_layers(teacher.config, plan)
    source = dict(teacher.named_modules())
    for name, module in list(student.named_modules()):
        layer = source.get(name)
        if name in sliced or layer is None or not _is_4bit(layer):
            continue
        if (module.in_features, module.out_features) != (layer.in_features, layer.out_features):
            raise PlanError(f"The student's {name} is {module.in_features} x {module.out_features}, the teacher's "
                            f"{layer.in_features} x {layer.out_features}: this plan does not fit the teacher.")
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, child, layer)
    _fill_the_rest(student, teacher, family, plan, sliced, source, dtype)
    student.requires_grad_(False)
    student.train(teacher.training)
    return student


def _fill_the_rest(student, teacher, family, plan, sliced, source, dtype) -> None:
    """Every tensor of ``student`` still on the meta device, and every buffer: the teacher's tensor of the same name
    (shared), or for a sliced 4-bit layer its dequantised kept columns in ``dtype``."""
    params = dict(teacher.named_parameters())
    buffers = dict(teacher.named_buffers())
    # Buffers are built for real by init_empty_weights (e.g. SD3's positional table): the teacher's are taken too.
    for name, tensor in list(student.named_parameters()) + list(student.named_buffers()):
        if not tensor.is_meta and not (name in buffers and tensor is not buffers[name]):
            continue
        module_path, _, attr = name.rpartition(".")
        if module_path in sliced and attr == "weight":
            full = dequantized_weight(source[module_path]).to(dtype)
        elif name in params:
            full = params[name].detach()
        elif name in buffers:
            full = buffers[name]
        else:
            raise PlanError(f"The NF4 teacher has no tensor {name} for its pruned student; it was not loaded as "
                            "this family's transformer.")
        kept = family.prune_state_dict({name: full}, plan, teacher.config)[name]
        owner = student.get_submodule(module_path) if module_path else student
        # setattr keeps a buffer's persistence; a Parameter replaces the meta one
        setattr(owner, attr, torch.nn.Parameter(kept, requires_grad=False) if isinstance(tensor, torch.nn.Parameter)
                else kept)


def _quant_state_tensors(tensor) -> list[torch.Tensor]:
    """The tensors a 4-bit weight's quantisation state holds besides its codes (scales, code tables)."""
    state = getattr(tensor, "quant_state", None)
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
        state = state.state2 if getattr(state, "nested", False) else None
    return out


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters, buffers and 4-bit quantisation states, each
    storage counted once however many modules share it."""
    seen: dict[int, int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        for t in [tensor, *_quant_state_tensors(tensor)]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


__all__ = ["dequantized_weight", "logical_numel", "shared_nf4_student", "storage_bytes"]
