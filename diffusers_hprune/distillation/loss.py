"""The distillation loss (DESIGN.md section 6, step 7): ``L = L_KD + lambda_feat * L_feat``.

``L_KD`` is the mean squared error between the student's and the teacher's predicted
velocity; ``L_feat`` sums, over the student's kept blocks, the mean squared error between
the two models' block outputs (image and text streams) at the same ORIGINAL block index.
Kept blocks keep their original indices in the pruned model, so pairing is by index.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from diffusers_hprune.architecture import get_family


class BlockFeatures(contextlib.AbstractContextManager):
    """Records each block's output, keyed by original block index, while a forward pass runs.

    ``with BlockFeatures(model, indices) as feats: model(...)``; then ``feats.outputs[i]`` is
    ``(text_stream or None, image_stream)``.
    """

    def __init__(self, transformer: nn.Module, indices=None):
        family = get_family(transformer)
        specs = family.block_specs(transformer.config)
        wanted = set(range(len(specs))) if indices is None else set(indices)
        self._targets = [(s.index, transformer.get_submodule(s.path)) for s in specs if s.index in wanted]
        self.outputs: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        self.outputs.clear()
        for index, module in self._targets:
            self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, index):
        def hook(module, args, output):
            self.outputs[index] = (output[0], output[1])

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def kept_blocks(student: nn.Module) -> list[int]:
    """Original indices of the blocks the student keeps (whole or partly pruned)."""
    family = get_family(student)
    removed = set(student.prune_plan.removed_blocks)
    return [s.index for s in family.block_specs(student.config) if s.index not in removed]


def loss_terms(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    student_features: dict[int, tuple],
    teacher_features: dict[int, tuple],
    lambda_feat: float = 1.0,
    task_loss: torch.Tensor | None = None,
    lambda_task: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The loss and its parts as tensors (``total``, ``kd``, ``feat``, and ``task`` when weighted); no host sync."""
    kd = nn.functional.mse_loss(student_out.float(), teacher_out.float())
    feat = kd.new_zeros(())
    for index, (s_text, s_image) in student_features.items():
        if index not in teacher_features:
            raise KeyError(f"The teacher has no recorded output for block {index}; record the same block indices.")
        t_text, t_image = teacher_features[index]
        feat = feat + nn.functional.mse_loss(s_image.float(), t_image.float())
        if s_text is not None and t_text is not None:
            feat = feat + nn.functional.mse_loss(s_text.float(), t_text.float())
    terms = {"kd": kd, "feat": feat, "total": kd + lambda_feat * feat}
    if task_loss is not None and lambda_task:
        terms["task"] = task_loss
        terms["total"] = terms["total"] + lambda_task * task_loss
    return terms


def distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    student_features: dict[int, tuple],
    teacher_features: dict[int, tuple],
    lambda_feat: float = 1.0,
    task_loss: torch.Tensor | None = None,
    lambda_task: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(L, {"kd": ..., "feat": ..., "task": ..., "total": ...})``; features paired by original block index."""
    terms = loss_terms(student_out, teacher_out, student_features, teacher_features, lambda_feat, task_loss,
                       lambda_task)
    parts = {k: float(terms[k].detach()) for k in ("kd", "feat", "task") if k in terms}
    parts["total"] = float(terms["total"].detach())
    return terms["total"], parts
