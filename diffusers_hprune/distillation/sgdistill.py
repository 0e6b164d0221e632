"""Sensitivity-Guided Distillation (DESIGN.md section 6, step 6).

Each trainable component ``c`` of each kept block ``i`` gets its own optimizer parameter
group with learning rate ``lr * m(i, c)``, where ``m`` is proportional to
``1 / (|dP(i, c)| + eps)`` and normalised so that the least sensitive trainable component
has ``m = 1``: the components whose removal hurt most move least. A component whose ``m``
falls below ``floor`` gets ``m = 0`` and does not train at all. The update is scaled, not
the gradient (Adam would cancel a gradient scale).

* Parameters of a block that no single component owns (the ``proj_out`` of a FLUX
  single-stream block, shared by its attention and MLP paths) get the multiplier of the
  whole block's ``dP(i, "block")``, on the same scale, capped at 1.
* Trainable parameters outside the blocks (``norm_out``, ``proj_out``) have no measured dP
  and get ``m = 1``.
* ``binary=True`` is the official code's variant for comparison: ``m`` is 1 where it would
  be at least ``floor`` and 0 elsewhere.
* ``eps``: dP has the unit of the analysis metric (a normalised error for velocity, an image MSE for image_fidelity, a score
  difference for HPSv2), so the default ``eps=None`` takes the median ``|dP|`` of the
  trainable components: rates then spread over about ``(|dP|max + med) / (|dP|min + med)``
  instead of the raw ratio of the extremes (four decades with velocity), which would leave
  the most sensitive parts with no update. A float sets it explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from diffusers_hprune.architecture import BLOCK, get_family
from diffusers_hprune.utils.errors import PlanError


@dataclass
class ParamGroup:
    """One optimizer parameter group: ``torch.optim`` takes ``[g.as_dict() for g in groups]``."""

    name: str
    multiplier: float
    lr: float
    params: list[nn.Parameter] = field(default_factory=list, repr=False)
    delta: float | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def as_dict(self) -> dict:
        return {"params": self.params, "lr": self.lr, "name": self.name}


def default_eps(deltas) -> float:
    """The median ``|dP|`` of the entries (see the module docstring)."""
    import statistics

    return float(statistics.median(abs(d) for d in deltas)) if deltas else 0.0


def sensitivity_multipliers(
    deltas: Mapping[tuple[int, str], float], eps: float | None = None, floor: float = 0.0, binary: bool = False
) -> dict[tuple[int, str], float]:
    """``m(i, c)`` for the given entries: ``(1 / (|dP| + eps))`` normalised to a maximum of 1, floored."""
    if not deltas:
        return {}
    if eps is None:
        eps = default_eps(deltas.values())
    raw = {k: 1.0 / (abs(d) + eps) for k, d in deltas.items()}
    top = max(raw.values())
    out = {}
    for k, r in raw.items():
        m = r / top
        out[k] = (1.0 if m >= floor else 0.0) if binary else (m if m >= floor else 0.0)
    return out


def sgdistill_param_groups(
    student: nn.Module,
    contributions: Mapping[tuple[int, str], float] | None,
    lr: float,
    *,
    enabled: bool = True,
    floor: float = 0.0,
    eps: float | None = None,
    binary: bool = False,
) -> list[ParamGroup]:
    """Parameter groups over the student's trainable parameters (call after :func:`apply_pwp`).

    With ``enabled=False`` (plain distillation: ratio below r_thres, or ``--no-sgdistill``)
    one group holds every trainable parameter at ``lr``. Groups with ``m = 0`` are left out
    and their parameters frozen (``requires_grad=False``).
    """
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not enabled:
        return [ParamGroup("all trainable", 1.0, lr, trainable)]
    if contributions is None:
        raise PlanError("SGDistill needs the contribution analysis (--analysis analysis.json), or pass --no-sgdistill.")
    family = get_family(student)
    plan = student.prune_plan
    config = student.config
    trainable_ids = {id(p) for p in trainable}
    groups: list[tuple[str, tuple[int, str], list[nn.Parameter]]] = []
    assigned: set[int] = set()
    for spec in family.block_specs(config):
        if spec.index in plan.removed_blocks:
            continue
        block = student.get_submodule(spec.path)
        removed = set(plan.removed_components.get(spec.index, ()))
        for c in spec.components:
            if c in removed:
                continue
            params = []
            for sub in family.component_submodules(spec, c):
                module = getattr(block, sub, None)
                if module is not None:
                    params += [p for p in module.parameters() if id(p) in trainable_ids and id(p) not in assigned]
            if params:
                assigned.update(id(p) for p in params)
                groups.append((f"block {spec.index}: {c}", (spec.index, c), params))
        shared = [p for p in block.parameters() if id(p) in trainable_ids and id(p) not in assigned]
        if shared:
            assigned.update(id(p) for p in shared)
            groups.append((f"block {spec.index}: shared", (spec.index, BLOCK), shared))
    keys = [k for _, k, _ in groups]
    missing = [k for k in keys if k not in contributions]
    if missing:
        i, c = missing[0]
        raise PlanError(
            f"The analysis has no dP for {len(missing)} trainable part(s) of the student (e.g. block {i}, {c}); "
            "use the analysis of this student's teacher, or pass --no-sgdistill."
        )
    component_keys = [k for k in keys if k[1] != BLOCK]
    if eps is None:
        eps = default_eps([contributions[k] for k in component_keys])
    multipliers = sensitivity_multipliers({k: contributions[k] for k in component_keys}, eps, floor, binary)
    top = max((1.0 / (abs(contributions[k]) + eps) for k in component_keys), default=1.0)
    out = []
    for name, key, params in groups:
        if key[1] == BLOCK:
            m = min(1.0, (1.0 / (abs(contributions[key]) + eps)) / top)
            m = (1.0 if m >= floor else 0.0) if binary else (m if m >= floor else 0.0)
        else:
            m = multipliers[key]
        if m == 0.0:
            for p in params:
                p.requires_grad_(False)
            continue
        out.append(ParamGroup(name, m, lr * m, params, contributions[key]))
    rest = [p for p in trainable if id(p) not in assigned]
    if rest:
        out.append(ParamGroup("outside the blocks", 1.0, lr, rest))
    return out
