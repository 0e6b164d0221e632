"""Publishing: the model card (:mod:`.card`, templates in ``templates/``), the export for stock Diffusers
(:mod:`.export`, with the generated modeling code of :mod:`.remote_code`) and ``hprune push`` (:mod:`.push`)."""

from diffusers_hprune.hub.card import CardError, render_model_card, rewrite_usage, usage_section, write_model_card
from diffusers_hprune.hub.export import ExportError, convert_lora_for_export, export_folder
from diffusers_hprune.hub.folders import FORMATS, PLAN_FILE, default_format, folder_format, folder_plan, original_blocks
from diffusers_hprune.hub.push import (
    IGNORE_PATTERNS,
    PushError,
    check_repo_id,
    exported,
    push_folder,
    require_token,
    upload_tree,
)
from diffusers_hprune.hub.remote_code import MODULE_NAME, modeling_source

__all__ = ["FORMATS", "IGNORE_PATTERNS", "MODULE_NAME", "PLAN_FILE", "CardError", "ExportError", "PushError",
           "check_repo_id", "convert_lora_for_export", "default_format", "export_folder", "exported", "folder_format", "folder_plan",
           "modeling_source", "original_blocks", "push_folder", "render_model_card", "require_token", "rewrite_usage",
           "upload_tree", "usage_section", "write_model_card"]
