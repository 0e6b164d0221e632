"""The FLUX.1 pipelines that hold a pruned transformer: text-to-image, img2img and inpainting."""

from __future__ import annotations

from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

from diffusers_hprune.families.flux.transformer import HierarchicalPrunedFluxTransformer2DModel
from diffusers_hprune.pipelines.pruned import PrunedPipelineMixin
from diffusers_hprune.utils.registration import register


class HierarchicalPrunedFluxPipeline(PrunedPipelineMixin, FluxPipeline):
    """``FluxPipeline`` whose transformer is a ``HierarchicalPrunedFluxTransformer2DModel``."""

    pruned_transformer_class = HierarchicalPrunedFluxTransformer2DModel


class HierarchicalPrunedFluxImg2ImgPipeline(PrunedPipelineMixin, FluxImg2ImgPipeline):
    """``FluxImg2ImgPipeline`` with a pruned transformer."""

    pruned_transformer_class = HierarchicalPrunedFluxTransformer2DModel


class HierarchicalPrunedFluxInpaintPipeline(PrunedPipelineMixin, FluxInpaintPipeline):
    """``FluxInpaintPipeline`` with a pruned transformer."""

    pruned_transformer_class = HierarchicalPrunedFluxTransformer2DModel


#: task -> (stock pipeline, its pruned version)
PIPELINES = {
    "text2image": (FluxPipeline, HierarchicalPrunedFluxPipeline),
    "image2image": (FluxImg2ImgPipeline, HierarchicalPrunedFluxImg2ImgPipeline),
    "inpaint": (FluxInpaintPipeline, HierarchicalPrunedFluxInpaintPipeline),
}
register(*(pruned for _, pruned in PIPELINES.values()))
