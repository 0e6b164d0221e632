"""Ablated forward passes: one removal at a time, evaluated from recorded transformer inputs.

The fidelity metric compares the velocity an ablated transformer predicts with the full
transformer's, at the exact inputs the pipeline fed the full transformer while drawing the
calibration images (:func:`record_transformer_calls`). Two ways to get the ablated output:

* naive (:func:`naive_outputs`): build the pruned model (``prune_transformer``, weights
  shared) and run every block;
* cached (:class:`BlockCache`): run the full model once per recorded call, keep every
  block's output, and for an ablation of block ``i`` replay the cached outputs of blocks
  ``< i`` instead of computing them; only block ``i`` (ablated) and the blocks after it run.

Both give bit-identical outputs on a deterministic device (the blocks before ``i`` see the
same inputs either way); the cached one runs about half the block evaluations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusers_hprune.architecture import BLOCK, RemovedBlock, get_family
from diffusers_hprune.contributions import AnalysisError
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.pruning.surgery import prune_transformer
from diffusers_hprune.utils.float64 import float64


@dataclass
class RecordedCall:
    """The keyword arguments of one transformer call and the full model's output."""

    kwargs: dict[str, Any]
    output: torch.Tensor | None = None
    step: int = 0


def _detach(value: Any, device: torch.device | str | None = None) -> Any:
    """A detached copy of ``value`` (tensors at any depth), on ``device`` (default: where it is)."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(device, copy=True) if device is not None else value.clone()
    if isinstance(value, dict):
        return {k: _detach(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v, device) for v in value)
    return value


def _on(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors (at any depth) on ``device``; those already there are not copied."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    return value


@contextlib.contextmanager
def record_transformer_calls(transformer: nn.Module, steps: set[int] | None = None, keep=None,
                             device=None) -> Iterator[list[RecordedCall]]:
    """Record the inputs of every call of ``transformer`` (or of the calls numbered in ``steps``, or those for which
    ``keep()`` is true when they happen); ``RecordedCall.step`` is the call's number among all calls.

    Use around a pipeline call; the list is filled as the pipeline runs. The inputs are copied to
    ``device`` (default: where they are); :func:`transformer_output` brings them back to the model.
    Outputs are not kept (they are recomputed by the analysis in the same way for every method).
    """
    calls: list[RecordedCall] = []
    counter = [0]

    def hook(module, args, kwargs):
        if args:
            raise RuntimeError("The transformer was called with positional arguments; recording needs keywords.")
        if (steps is None or counter[0] in steps) and (keep is None or keep()):
            kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
            calls.append(RecordedCall(kwargs=_detach(kwargs, device), step=counter[0]))
        counter[0] += 1

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def transformer_output(transformer: nn.Module, call: RecordedCall) -> torch.Tensor:
    """The velocity the transformer predicts for a recorded call (its inputs moved to the model's device if kept
    elsewhere)."""
    with torch.no_grad():
        out = transformer(**_on(call.kwargs, next(transformer.parameters()).device), return_dict=False)
    return out[0] if isinstance(out, tuple) else out


class BlockCounter:
    """Counts forward calls of real (not replayed, not removed) blocks of a transformer."""

    def __init__(self):
        self.count = 0
        self._handles = []

    def attach(self, transformer: nn.Module) -> BlockCounter:
        family = get_family(transformer)
        for block in family.block_modules(transformer):
            if not isinstance(block, (RemovedBlock, _Replay)):
                self._handles.append(block.register_forward_pre_hook(self._count))
        return self

    def _count(self, module, args):
        self.count += 1

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def entry_plan(family, config, index: int, component: str | tuple[str, ...]) -> PrunePlan:
    """The (normalised) plan that removes ``component`` (or several) of block ``index``; ``"block"`` = the whole block."""
    names = (component,) if isinstance(component, str) else tuple(component)
    if BLOCK in names:
        plan = PrunePlan(removed_blocks=[index], family=family.name, num_blocks=family.num_blocks(config))
    else:
        plan = PrunePlan(
            removed_components={index: list(names)}, family=family.name, num_blocks=family.num_blocks(config)
        )
    return family.check_plan(plan, config)


def naive_outputs(transformer: nn.Module, plan: PrunePlan, calls: list[RecordedCall],
                  counter: BlockCounter | None = None) -> list[torch.Tensor]:
    """Outputs of the pruned transformer (weights shared with ``transformer``) for every call."""

    ablated = prune_transformer(transformer, plan) if not plan.is_empty else transformer
    if counter is not None:
        counter.attach(ablated)
    try:
        return [transformer_output(ablated, call) for call in calls]
    finally:
        if counter is not None:
            counter.detach()


class _Replay(nn.Module):
    """Stands in for a block: returns the output the full model's block produced, computing nothing."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of the cosine similarity of ``a`` and ``b`` (``[..., dim]``) and the token count."""
    cos = nn.functional.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return float(float64(cos).sum()), cos.numel()


@dataclass
class BlockCache:
    """Every block's output of the full model for each recorded call, and ablated runs from it.

    Build with :meth:`build`. ``similarity[i]`` is the mean per-token cosine similarity of
    block ``i``'s input and output (image and text streams together): what the ``koala``
    planning strategy ranks by.
    """

    transformer: nn.Module
    calls: list[RecordedCall]
    block_outputs: list[list[Any]]  # [call][block] -> the block's return value
    similarity: dict[int, float] = field(default_factory=dict)
    device: Any = None

    @classmethod
    def build(cls, transformer: nn.Module, calls: list[RecordedCall], cache_device=None,
              counter: BlockCounter | None = None, max_bytes: int | None = None) -> BlockCache:
        """Run every recorded call once, keeping each block's output (on ``cache_device``).

        With ``max_bytes``, the first call's outputs times the number of calls is the cache's
        size; above the bound, :class:`AnalysisError` is raised before the other calls run.
        """
        family = get_family(transformer)
        blocks = family.block_modules(transformer)
        current: list[Any] = []
        sums = [[0.0, 0] for _ in blocks]

        def make_hooks(index):
            def pre(module, args, kwargs):
                streams = [kwargs.get("hidden_states", args[0] if args else None), kwargs.get("encoder_hidden_states")]
                module._hprune_inputs = streams

            def post(module, args, kwargs, output):
                current.append(_detach(output, cache_device))
                inputs = module._hprune_inputs
                del module._hprune_inputs
                outputs = [output[1], output[0]]  # blocks return (encoder_hidden_states, hidden_states)
                for x, y in zip(inputs, outputs):
                    if x is not None and y is not None and x.shape == y.shape:
                        s, n = _cosine(x, y)
                        sums[index][0] += s
                        sums[index][1] += n

            return pre, post

        handles = []
        for i, block in enumerate(blocks):
            pre, post = make_hooks(i)
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        if counter is not None:
            counter.attach(transformer)
        outputs = []
        try:
            for call in calls:
                current = []
                call.output = transformer_output(transformer, call)
                outputs.append(current)
                if max_bytes is not None and len(outputs) == 1:
                    _check_cache_size(_tensor_bytes(current) * len(calls), len(calls), max_bytes)
        finally:
            for h in handles:
                h.remove()
            if counter is not None:
                counter.detach()
        similarity = {i: s / n for i, (s, n) in enumerate(sums) if n}
        return cls(transformer, calls, outputs, similarity, cache_device)

    @contextlib.contextmanager
    def _swapped(self, index: int, replacement: nn.Module, call_index: int):
        """Blocks before ``index`` replay, block ``index`` is ``replacement``; restored on exit.

        Only the output of block ``index - 1`` reaches block ``index``, so every replayed
        block returns that one (moved to the model's device once): nothing before it is
        computed or transferred.
        """
        family = get_family(self.transformer)
        specs = family.block_specs(self.transformer.config)
        originals = {}
        replay = _Replay(self._on_device(self.block_outputs[call_index][index - 1])) if index > 0 else None
        try:
            for spec in specs[: index + 1]:
                originals[spec.path] = self.transformer.get_submodule(spec.path)
                self.transformer.set_submodule(spec.path, replay if spec.index < index else replacement)
            yield
        finally:
            for path, module in originals.items():
                self.transformer.set_submodule(path, module)

    def _on_device(self, value):
        if self.device is None:
            return value
        device = next(self.transformer.parameters()).device
        return _detach(value, device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached block outputs."""
        return sum(_tensor_bytes(outputs) for outputs in self.block_outputs)

    def ablated_outputs(self, plan: PrunePlan, counter: BlockCounter | None = None,
                        calls: list[int] | None = None) -> list[torch.Tensor]:
        """Outputs of the transformer with ``plan`` (one block touched) applied, for every recorded call
        (or for the calls numbered in ``calls``).

        An empty plan replays every block: the output is rebuilt from the cache alone (no
        block runs), which must equal the full model's output (a check of the cache).
        """
        family = get_family(self.transformer)
        touched = sorted(set(plan.removed_blocks) | set(plan.removed_components))
        if len(touched) > 1:
            raise ValueError(f"A cached ablation touches exactly one block; this plan touches {touched}.")
        specs = family.block_specs(self.transformer.config)
        index = touched[0] if touched else len(specs)
        spec = specs[index] if touched else None
        block = self.transformer.get_submodule(spec.path) if touched else None
        if not touched:
            replacement = None
        elif index in plan.removed_blocks:
            replacement = RemovedBlock(context_pre_only=getattr(block, "context_pre_only", False))
        else:
            replacement = family.pruned_block(block, spec, frozenset(plan.removed_components[index]))
        outputs = []
        for c in range(len(self.calls)) if calls is None else calls:
            call = self.calls[c]
            with self._swapped(index, replacement, c):
                if counter is not None:
                    counter.attach(self.transformer)
                try:
                    outputs.append(transformer_output(self.transformer, call))
                finally:
                    if counter is not None:
                        counter.detach()
        return outputs


@contextlib.contextmanager
def served_calls(transformer: nn.Module, outputs: dict[int, torch.Tensor]) -> Iterator[None]:
    """Calls of ``transformer`` numbered in ``outputs`` (0 = the first call inside the block) return that
    output without running; the others run as usual.

    The image metrics use it to serve the ablated model's first denoising step from the block
    cache (:meth:`BlockCache.ablated_outputs`): that step sees exactly the inputs the full
    model saw, so its output is the one the cache replays, bit for bit.
    """
    if not outputs:
        yield
        return
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    count = [0]
    forward = transformer.forward

    def serve(*args, **kwargs):
        k = count[0]
        count[0] += 1
        if k not in outputs:
            return forward(*args, **kwargs)
        out = outputs[k]
        return (out,) if kwargs.get("return_dict", True) is False else Transformer2DModelOutput(sample=out)

    transformer.forward = serve
    try:
        yield
    finally:
        del transformer.forward


def _tensor_bytes(outputs: list) -> int:
    total = 0
    for out in outputs:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _check_cache_size(predicted: int, calls: int, max_bytes: int) -> None:
    if predicted > max_bytes:
        raise AnalysisError(
            f"The block-output cache would hold {predicted / 1e9:.2f} GB ({calls} recorded transformer calls), above "
            f"--max-cache-bytes {max_bytes / 1e9:.2f} GB. Keep it off the GPU with --cache-device cpu, or record "
            "fewer calls (--n-prompts, --eval-steps), draw smaller images (--height/--width), or use "
            "--method naive (no cache, slower)."
        )


def normalised_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """``sum ||out - ref||^2 / sum ||ref||^2`` over all calls, in float64."""
    num = sum(float((float64(o) - float64(r)).pow(2).sum()) for o, r in zip(outputs, references))
    den = sum(float(float64(r).pow(2).sum()) for r in references)
    return num / den if den > 0 else num
