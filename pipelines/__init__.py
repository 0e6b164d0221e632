"""Custom-code pipeline files uploaded next to published checkpoints (``hprune push``).

Installed as ``diffusers_hprune.remote_code``. Each file names exactly one pipeline class, as
Diffusers' custom-pipeline loader requires, so that a Hub repo loads with
``DiffusionPipeline.from_pretrained(repo, custom_pipeline="hprune_<family>_pipeline",
trust_remote_code=True)`` without the caller importing ``diffusers_hprune``.
"""
