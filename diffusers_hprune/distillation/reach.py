"""Which trainable parameters of a student can change the distillation loss at all.

A parameter whose output nothing reads never gets a gradient. Alone that wastes optimizer
memory; under DDP it stops the run at its second step ("parameters that were not used in
producing loss"). The plans already drop modulations nobody reads
(:meth:`~diffusers_hprune.families.ModelFamily.unread_modulations`); what remains depends on the
loss: with ``lambda_feat = 0`` only the final output counts, and e.g. an SD3 plan without the last
block leaves the new last block's text-stream output (its ``ff_context``) unread.

:func:`parameters_off_the_loss` finds them without training: one forward of the student on a
tiny input (4 latent tokens, 2 text tokens), then a walk of the autograd graph from the loss's
inputs (the output, and the block features when ``lambda_feat > 0``) to the parameters it
reaches. Which operations read which parameters does not depend on the input's values or
size, so the answer holds for every batch; it costs a forward of a few tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_hprune.architecture import get_family
from diffusers_hprune.distillation.loss import BlockFeatures, kept_blocks


def probe_inputs(student: nn.Module, dtype: torch.dtype, device) -> dict:
    """The student's keyword arguments for a batch of one, 4 x 4 latents and 2 text tokens, in ``dtype``."""
    family = get_family(student)
    config = student.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, family.latent_channels(config), 4, 4, generator=generator).to(device, dtype)
    text = {
        "prompt_embeds": torch.randn(1, 2, int(config["joint_attention_dim"]), generator=generator).to(device, dtype),
        "pooled_projections": torch.randn(1, int(config["pooled_projection_dim"]), generator=generator).to(device, dtype),
    }
    sigmas = torch.full((1,), 0.5, device=device)
    return family.denoiser_inputs(student, latents, sigmas, text)


def parameters_off_the_loss(student: nn.Module, lambda_feat: float) -> list[str]:
    """Names of the student's trainable parameters that no term of the distillation loss depends on.

    ``L_KD`` (and ``L_task``) read the output; ``L_feat`` (when ``lambda_feat > 0``) every kept
    block's image and text outputs. Nothing is changed; no gradient is computed.
    """
    trainable = {id(p): name for name, p in student.named_parameters() if p.requires_grad}
    if not trainable:
        return []
    first = next(p for p in student.parameters() if p.is_floating_point())
    device = first.device
    dtype = next((p.dtype for p in student.parameters() if p.is_floating_point() and not p.requires_grad), first.dtype)
    inputs = probe_inputs(student, dtype, device)
    roots = []
    with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
            BlockFeatures(student, kept_blocks(student)) as features:
        output = student(**inputs, return_dict=False)[0]
        roots.append(output)
        if lambda_feat:
            roots += [t for streams in features.outputs.values() for t in streams if t is not None]
    reached = _reached_leaves([r.grad_fn for r in roots if r.grad_fn is not None])
    return [name for key, name in trainable.items() if key not in reached]


def _reached_leaves(roots) -> set[int]:
    """``id`` of every leaf tensor (parameter) the autograd graph below ``roots`` accumulates a gradient into."""
    reached, seen, stack = set(), set(), list(roots)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: the parameter itself
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


__all__ = ["parameters_off_the_loss", "probe_inputs"]
