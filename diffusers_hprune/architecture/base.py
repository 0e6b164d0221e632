"""What every model family provides, and the mechanics they share.

A family's folder (``diffusers_hprune/families/sd3/``, ``families/flux/``) is the ONE place that
knows the family: which blocks exist in which order, which components each block has, which
parameters each component owns, how each is removed, its pruned model and pipeline classes, its
published pipeline's components (for the memory budget) and its part of the remote code. Every
other stage (planning, analysis, distillation, quantisation, budget, reports) asks the family
object instead of naming modules itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusers_hprune.architecture.checkpoints import CheckpointLayout
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.compat import register_block_streams
from diffusers_hprune.utils.errors import PlanError

BLOCK = "block"
"""Pseudo-component name for a whole block (used by analysis reports and plans)."""


@dataclass(frozen=True)
class BlockSpec:
    """One transformer block, as the method sees it.

    Attributes:
        index: global execution-order index (FLUX: double blocks first, then single blocks).
        path: module path inside the transformer, e.g. ``"single_transformer_blocks.3"``.
        kind: ``"joint"`` (SD3 JointTransformerBlock), ``"double"`` or ``"single"`` (FLUX).
        components: canonical names of the removable components of this block.
        branches: the subset of ``components`` that are residual branches; a block
            with every branch removed is the identity and counts as a removed block.
        dual_attention: SD3.5 dual-attention block (``attn`` then covers ``attn`` and ``attn2``).
        context_pre_only: SD3 last block (no text-stream output, no ``ff_context``).
        modulations: ``(modulation, the branches that read it)`` for each AdaLN modulation of the
            block: a modulation whose every reader is removed computes nothing that is used, and a
            plan removes it too (:meth:`ModelFamily.unread_modulations`).
    """

    index: int
    path: str
    kind: str
    components: tuple[str, ...]
    branches: tuple[str, ...]
    dual_attention: bool = False
    context_pre_only: bool = False
    modulations: tuple[tuple[str, tuple[str, ...]], ...] = ()


class ModelFamily(CheckpointLayout):
    """Structure knowledge of one model family. Subclasses fill in the class attributes and hooks."""

    name: str = ""
    display_name: str = ""
    base_class_name: str = ""
    pruned_class_name: str = ""
    component_names: tuple[str, ...] = ()
    default_alpha: float = 0.0
    """Position-weight alpha the paper used for this family (DESIGN.md section 6, step 2)."""
    input_modules: tuple[str, ...] = ()
    """Top-level modules that run before the first block (embedders)."""
    output_modules: tuple[str, ...] = ("norm_out", "proj_out")
    """Top-level modules that run after the last block."""
    nf4_skip_modules: tuple[str, ...] | None = None
    """Modules kept in 16-bit when quantising to NF4 (default: the input and output modules).

    Diffusers' bitsandbytes loader matches these names at any depth (a linear layer whose
    own name is listed is skipped wherever it sits), so a family lists only names that do
    not also occur inside its blocks.
    """

    @property
    def default_nf4_skip_modules(self) -> tuple[str, ...]:
        return self.nf4_skip_modules if self.nf4_skip_modules is not None else self.input_modules + self.output_modules

    negative_prompt_default: str | None = None
    """The negative prompt the family's pipeline encodes itself when its guidance needs one and none is given
    (SD3: the empty prompt); ``None`` when it then draws without (FLUX's true CFG needs a negative prompt)."""

    text_has_clip_tokens: bool = False
    """True when the transformer's text stream holds the CLIP tokens before the T5 tokens (SD3)."""

    def text_tokens(self, max_sequence_length: int, clip_length: int = 77) -> int:
        """Tokens of the transformer's text stream for a T5 length (SD3: CLIP's ``clip_length`` + T5's)."""
        return max_sequence_length + (clip_length if self.text_has_clip_tokens else 0)

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        """Channels of the VAE latents the transformer denoises (before any patch packing)."""
        return int(config["in_channels"])

    # -- the family's folder: its classes, configs and published pipeline -----------------------
    model_module: str = ""
    """The module that defines the pruned transformer class (``pruned_class_name``); imported on first use."""
    pipeline_module: str = ""
    """The module whose ``PIPELINES`` maps each task (``"text2image"``, ``"image2image"``, ``"inpaint"``) to
    ``(stock pipeline class, pruned pipeline class)``; imported on first use. Empty: the family has no pipelines."""
    pipeline_class_names: tuple[str, ...] = ()
    """The pruned pipeline classes ``pipeline_module`` defines: Diffusers finds them by name before it is imported."""
    auto_pipeline_name: str = ""
    """The pruned pipelines' model type in Diffusers' ``AutoPipelineFor*`` tables (e.g. ``hprune-flux``)."""
    builtin_configs: Mapping[str, str] = {}
    """Published transformer configs the family ships: name (``hprune budget sd3.5-large``) -> a file in the
    ``configs`` folder beside the family's module."""
    published_components: Mapping[str, int] = {}
    """Parameter count of each component of the family's published pipeline besides the transformer (text
    encoders, ``vae``): what the memory budget assumes when no pipeline folder is at hand."""
    published_vae_config: Mapping[str, Any] = {}
    """The published pipeline's VAE config (the budget's default, as ``published_components``)."""
    published_models: Mapping[str, Mapping[str, Any]] = {}
    """Name -> how each published model of the family is meant to be called (its model card's settings):
    ``display_name``, ``repo_ids``, ``num_inference_steps``, ``guidance_scale``, ``guidance_argument``,
    ``max_sequence_length``, ``resolution`` (``profiles.GenerationProfile``). A name that is also in
    ``builtin_configs`` is recognised by its config too; models sharing one config file share an architecture."""
    guidance_is_cfg: bool = False
    """True when the pipeline's ``guidance_scale`` runs classifier-free guidance (two transformer passes a step)."""
    paper_max_sequence_length: int = 256
    """The T5 length of the paper's protocol for this family: the budget's default for inference."""

    def class_modules(self) -> dict[str, str]:
        """The family's pruned classes by name -> the module that defines each (imported on first use)."""
        out = {self.pruned_class_name: self.model_module} if self.model_module and self.pruned_class_name else {}
        return out | {name: self.pipeline_module for name in self.pipeline_class_names if self.pipeline_module}

    @property
    def folder_package(self) -> str:
        """The package of the family's folder (where its ``configs`` live): the package of its class's module."""
        return type(self).__module__.rpartition(".")[0]

    # -- identification -------------------------------------------------------
    @property
    def base_class(self) -> type:
        """The stock transformer class, Diffusers' ``base_class_name``; a family of a class Diffusers does not
        define (one from another package) overrides this property to return it."""
        import diffusers

        return getattr(diffusers, self.base_class_name)

    def matches(self, obj: Any) -> bool:
        """True for a transformer instance/class of this family or a config naming one."""
        if isinstance(obj, Mapping):
            return obj.get("_class_name") in (self.base_class_name, self.pruned_class_name)
        cls = obj if isinstance(obj, type) else type(obj)
        try:
            base = self.base_class
        except AttributeError:  # a class Diffusers does not have, and the family does not give: no model is of it
            return False
        return isinstance(cls, type) and issubclass(cls, base)

    # -- structure --------------------------------------------------------------
    def block_specs(self, config: Mapping[str, Any]) -> list[BlockSpec]:
        """Every block in execution order, derived from the transformer config alone."""
        raise NotImplementedError

    def component_submodules(self, spec: BlockSpec, component: str) -> tuple[str, ...]:
        """Submodule names (relative to the block) whose parameters belong wholly to ``component``."""
        raise NotImplementedError

    def shared_parameter_slices(self, spec: BlockSpec, component: str, config: Mapping[str, Any]) -> dict[str, tuple[int, slice]]:
        """Parameters that a component owns only a slice of: name (relative to the block) -> (dim, slice)."""
        return {}

    def pruned_block(self, block: nn.Module, spec: BlockSpec, removed: frozenset[str]) -> nn.Module:
        """A module replacing ``block`` with the ``removed`` components gone (adopts the kept submodules)."""
        raise NotImplementedError

    def num_blocks(self, config: Mapping[str, Any]) -> int:
        return len(self.block_specs(config))

    # -- denoising: how the family's pipelines feed the transformer --------------------
    def encode_text(self, pipe, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """Text conditioning of ``prompts`` with the pipeline's encoders: ``prompt_embeds``, ``pooled_projections``."""
        raise NotImplementedError

    def denoiser_inputs(self, transformer: nn.Module, latents: torch.Tensor, sigmas: torch.Tensor,
                        text: Mapping[str, torch.Tensor], guidance_scale: float | None = None) -> dict[str, Any]:
        """Transformer keyword arguments for noisy ``latents`` (``B, C, H, W``, the VAE's scaled latent space)
        at noise levels ``sigmas`` (``B``, in [0, 1]), in the family's own conventions."""
        raise NotImplementedError

    def denoiser_output(self, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's prediction in the shape of ``latents`` (``B, C, H, W``)."""
        return output

    def pipeline_latents(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents a pipeline returned with ``output_type="latent"``, as ``B, C, H, W``."""
        return latents

    # -- parameter accounting -----------------------------------------------------
    def component_numel(self, block: nn.Module, spec: BlockSpec, component: str, config: Mapping[str, Any]) -> int:
        """Parameters held by ``component`` of the (unpruned) ``block``; works on the meta device."""
        return sum(n for _, n, _ in self.component_parameters(block, spec, component, config))

    def component_parameters(
        self, block: nn.Module, spec: BlockSpec, component: str, config: Mapping[str, Any]
    ) -> list[tuple[str, int, bool]]:
        """``(name, numel, is_linear_weight)`` of every parameter (or slice of one) that ``component`` owns.

        Names are relative to the block; a slice keeps the name of its parameter. The
        flag tells the memory estimates which parameters 4-bit quantisation would pack.
        """
        if component == BLOCK:
            return _parameters_of(block, "")
        out = []
        for sub in self.component_submodules(spec, component):
            module = getattr(block, sub, None)
            if module is not None:
                out += _parameters_of(module, sub + ".")
        params = dict(block.named_parameters())
        for name, (dim, sl) in self.shared_parameter_slices(spec, component, config).items():
            owner = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            linear = isinstance(owner, nn.Linear) and name.endswith(".weight")
            out.append((name, params[name].narrow(dim, sl.start, sl.stop - sl.start).numel(), linear))
        return out

    # -- plans ------------------------------------------------------------------------
    def empty_plan(self, config: Mapping[str, Any]) -> PrunePlan:
        return PrunePlan(family=self.name, num_blocks=self.num_blocks(config))

    def check_plan(self, plan: PrunePlan, config: Mapping[str, Any]) -> PrunePlan:
        """Validate ``plan`` against a concrete config and return its normalised form.

        Raises :class:`PlanError` when the plan was made for another family or block
        count, or names a component a block does not have. A block whose residual
        branches are all removed is the identity, so it is moved to ``removed_blocks``; a
        modulation whose every reader is removed is removed with them
        (:meth:`unread_modulations`): it holds weights that no longer change the output and
        would never get a gradient in training.
        """
        if plan.family != self.name:
            raise PlanError(
                f"This prune plan was made for the {plan.family!r} family but the model is a {self.display_name} "
                f"({self.name!r}) transformer; make a plan for this model (e.g. `hprune plan` on its analysis)."
            )
        specs = self.block_specs(config)
        if plan.num_blocks != len(specs):
            raise PlanError(
                f"This prune plan was made for a {plan.family} transformer with {plan.num_blocks} blocks, but the "
                f"model has {len(specs)} blocks; make a plan for this model."
            )
        removed_blocks = set(plan.removed_blocks)
        components: dict[int, list[str]] = {}
        for index, names in plan.removed_components.items():
            spec = specs[index]
            invalid = [n for n in names if n not in spec.components]
            if invalid:
                raise PlanError(
                    f"Block {index} ({spec.path}, a {spec.kind} block) has no component(s) {invalid}; "
                    f"its components are {', '.join(spec.components)}."
                )
            if set(spec.branches) <= set(names):
                removed_blocks.add(index)
            else:
                components[index] = [*names, *self.unread_modulations(spec, names)]
        normalised = PrunePlan(
            removed_blocks=sorted(removed_blocks),
            removed_components=components,
            family=plan.family,
            num_blocks=plan.num_blocks,
            metadata=plan.metadata,
        )
        return normalised

    @staticmethod
    def unread_modulations(spec: BlockSpec, removed) -> list[str]:
        """The modulations of ``spec`` that ``removed`` leaves without a reader, not yet in ``removed``.

        E.g. a dual-stream block without ``attn`` and ``ff_context``: nothing reads the text
        modulation ``norm1_context`` any more.
        """
        return [m for m in _unread(spec, removed) if m not in set(removed)]

    def unread_module_paths(self, config: Mapping[str, Any], plan: PrunePlan) -> list[str]:
        """Module paths of the removed modulations that no kept branch of their block reads (``plan`` normalised).

        Their weights change nothing in the output: a checkpoint saved before plans listed such a
        modulation (it holds its weights) loads without them and computes the same images.
        """
        out = []
        for spec in self.block_specs(config):
            removed = plan.removed_components.get(spec.index, ())
            for m in _unread(spec, removed):
                if m in removed:
                    out += [f"{spec.path}.{sub}" for sub in self.component_submodules(spec, m)]
        return out

    # -- surgery ------------------------------------------------------------------------
    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        """The block modules of ``model`` in execution order."""
        return [model.get_submodule(spec.path) for spec in self.block_specs(model.config)]

    def apply_plan(self, model: nn.Module, plan: PrunePlan) -> None:
        """Replace, in place, the removed blocks and components of ``model`` (plan already checked)."""
        for spec in self.block_specs(model.config):
            if spec.index in plan.removed_blocks:
                block = model.get_submodule(spec.path)
                model.set_submodule(spec.path, RemovedBlock(context_pre_only=getattr(block, "context_pre_only", False)))
            elif spec.index in plan.removed_components:
                block = model.get_submodule(spec.path)
                removed = frozenset(plan.removed_components[spec.index])
                model.set_submodule(spec.path, self.pruned_block(block, spec, removed))

    # -- Diffusers' hooks and regional compilation ---------------------------------------------
    def pruned_block_classes(self) -> tuple[type, ...]:
        """The block classes a pruned model of this family may hold besides the stock ones."""
        return (RemovedBlock,)

    def register_with_diffusers_hooks(self) -> None:
        """Tell Diffusers' cache hooks (First Block Cache, TaylorSeer, ...) how the pruned blocks return their streams.

        Like the stock SD3 and FLUX blocks, every pruned block returns ``(text, image)``. Diffusers
        keeps this in a private registry (``diffusers.hooks._helpers``); without it, a hook stops
        with "Model class ... not registered". Called when a pruned model is built.
        """
        register_block_streams(self.pruned_block_classes(), text_index=0, image_index=1)

def adapter_layers(model: nn.Module) -> list[str]:
    """Module paths of ``model`` that hold (unfused or fused but not unloaded) PEFT adapter layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def refuse_adapters(model: nn.Module, doing: str) -> None:
    """Raise :class:`PlanError` when ``model`` holds LoRA (PEFT) layers: ``doing`` them would lose or garble them."""
    layers = adapter_layers(model)
    if layers:
        shown = ", ".join(layers[:3]) + (f", ... ({len(layers) - 3} more)" if len(layers) > 3 else "")
        raise PlanError(
            f"Cannot {doing}: the transformer holds LoRA adapter layers ({shown}). Fuse or unload the LoRA first: "
            "`pipe.fuse_lora()` then `pipe.unload_lora_weights()` keeps its effect in the weights; "
            "`pipe.unload_lora_weights()` alone drops it."
        )


def _unread(spec: BlockSpec, removed) -> list[str]:
    """The modulations of ``spec`` whose every reader is in ``removed``."""
    gone = set(removed)
    return [m for m, readers in spec.modulations if set(readers) <= gone]


def _parameters_of(module: nn.Module, prefix: str) -> list[tuple[str, int, bool]]:
    out = []
    for module_name, sub in module.named_modules():
        for pname, p in sub.named_parameters(recurse=False):
            name = f"{prefix}{module_name}.{pname}" if module_name else f"{prefix}{pname}"
            out.append((name, p.numel(), isinstance(sub, nn.Linear) and pname == "weight"))
    return out


class RemovedBlock(nn.Module):
    """A removed block: the identity on both streams, with no parameters."""

    def __init__(self, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return encoder_hidden_states, hidden_states

    def extra_repr(self) -> str:
        return "identity"


def match_batch(context: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a batch-1 text stream to the image batch.

    FluxPipeline's true-CFG call passes one negative prompt embedding for a whole batch of
    latents; the stock blocks broadcast it through the text modulation. A block without
    that modulation must broadcast explicitly to compute the same thing.
    """
    if context is not None and context.shape[0] == 1 and hidden_states.shape[0] > 1:
        return context.expand(hidden_states.shape[0], *context.shape[1:])
    return context


def plain_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """What a removed modulation leaves: LayerNorm without affine, eps 1e-6."""
    return nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """AdaLN modulation ``x * (1 + scale) + shift``; shift and scale are 0 when the modulation was removed."""
    if shift is None:
        return x
    return x * (1 + scale[:, None]) + shift[:, None]


def gated(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``gate * x``; the gate is 1 when the modulation was removed."""
    return x if gate is None else gate.unsqueeze(1) * x
