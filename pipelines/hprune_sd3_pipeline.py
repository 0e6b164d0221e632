"""A HierarchicalPrune-compressed Stable Diffusion 3 / 3.5 pipeline, for Diffusers' custom-code loading.

    pipe = DiffusionPipeline.from_pretrained(REPO, custom_pipeline="hprune_sd3_pipeline", trust_remote_code=True)

Needs ``pip install diffusers-hprune``: importing it registers the pruned (and NF4) model
classes with Diffusers, which then builds the pruned transformer from its config.
"""

from diffusers_hprune import HierarchicalPrunedSD3Pipeline  # noqa: F401  (the one pipeline class of this file)
