"""The SD3 pipelines that hold a pruned transformer: text-to-image, img2img and inpainting."""

from __future__ import annotations

from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

from diffusers_hprune.families.sd3.transformer import HierarchicalPrunedSD3Transformer2DModel
from diffusers_hprune.pipelines.pruned import PrunedPipelineMixin
from diffusers_hprune.utils.registration import register


class HierarchicalPrunedSD3Pipeline(PrunedPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose transformer is a ``HierarchicalPrunedSD3Transformer2DModel``.

    Everything else (text encoders, VAE, scheduler, ``__call__``) is the stock pipeline.
    After ``import diffusers_hprune``, ``DiffusionPipeline.from_pretrained`` returns this class
    for folders and Hub repos saved from it.
    """

    pruned_transformer_class = HierarchicalPrunedSD3Transformer2DModel


class HierarchicalPrunedSD3Img2ImgPipeline(PrunedPipelineMixin, StableDiffusion3Img2ImgPipeline):
    """``StableDiffusion3Img2ImgPipeline`` with a pruned transformer (``from_pipe(pruned)``, ``AutoPipelineForImage2Image``)."""

    pruned_transformer_class = HierarchicalPrunedSD3Transformer2DModel


class HierarchicalPrunedSD3InpaintPipeline(PrunedPipelineMixin, StableDiffusion3InpaintPipeline):
    """``StableDiffusion3InpaintPipeline`` with a pruned transformer (``from_pipe(pruned)``, ``AutoPipelineForInpainting``)."""

    pruned_transformer_class = HierarchicalPrunedSD3Transformer2DModel


#: task -> (stock pipeline, its pruned version)
PIPELINES = {
    "text2image": (StableDiffusion3Pipeline, HierarchicalPrunedSD3Pipeline),
    "image2image": (StableDiffusion3Img2ImgPipeline, HierarchicalPrunedSD3Img2ImgPipeline),
    "inpaint": (StableDiffusion3InpaintPipeline, HierarchicalPrunedSD3InpaintPipeline),
}
register(*(pruned for _, pruned in PIPELINES.values()))
