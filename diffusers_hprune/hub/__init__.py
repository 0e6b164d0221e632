"""Publishing: the model card (:mod:`.card`, template in ``templates/``) and ``hprune push`` (:mod:`.push`)."""

from diffusers_hprune.hub.card import CardError, render_model_card, write_model_card
from diffusers_hprune.hub.push import (
    IGNORE_PATTERNS,
    PushError,
    add_remote_code,
    push_folder,
    remote_code_name,
    require_token,
    upload_tree,
)

__all__ = ["IGNORE_PATTERNS", "CardError", "PushError", "add_remote_code", "push_folder", "remote_code_name",
           "render_model_card", "require_token", "upload_tree", "write_model_card"]
