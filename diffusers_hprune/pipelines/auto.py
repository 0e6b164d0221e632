"""Imported right after Diffusers' ``auto_pipeline`` module (``diffusers_hprune/__init__.py`` arranges it): adds
every registered family's pruned pipelines to the ``AutoPipelineFor*`` tables."""

from diffusers_hprune.pipelines.pruned import register_auto_pipelines

register_auto_pipelines()
