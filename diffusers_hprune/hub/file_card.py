"""The model card of a single-file or GGUF upload (``hprune push --format single-file|gguf``): what the file is,
where the tools put it, and the Diffusers code that reads it with the base model's other components."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers_hprune.architecture import get_family
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.utils.fileio import atomic_write_text

TEMPLATE = Path(__file__).parent / "templates" / "file_card.md"


def write_file_card(folder: str | os.PathLike, *, file_name: str, config: dict, plan: PrunePlan, pipeline_class: str,
                    base_model: str, repo_id: str, quant: str | None = None, license: str | None = None) -> Path:
    """Write ``folder/README.md`` for the file ``file_name`` (a transformer of the unpruned ``config`` pruned by
    ``plan``, of the stock pipeline ``pipeline_class``; ``quant``: its GGUF kind, ``None`` for a safetensors single
    file) published under ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    family = get_family(config)
    tags = ["diffusers-hprune", "hierarchicalprune", "pruned", "text-to-image", family.name]
    tags += ["gguf", quant.lower()] if quant else ["single-file"]
    on_hub = "/" in base_model and not Path(base_model).exists()
    relation = {"base_model": base_model, "base_model_relation": "finetune"} if on_hub else {}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
                         license=license or "other", **relation)
    total = family.num_blocks(config)
    card = ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=repo_id.split("/")[-1], base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if on_hub else "", family=family.display_name,
        gguf=quant is not None, quant=quant, gguf_architecture=family.original_layout.gguf_architecture,
        tools_count_blocks=family.original_layout.tools_count_blocks,
        kept_blocks=total - len(plan.removed_blocks), total_blocks=total, plan_words=plan.describe(),
        file_name=file_name, repo_id=repo_id, pipeline_class=pipeline_class, base_class=family.base_class_name,
    )
    atomic_write_text(Path(folder) / "README.md", str(card))
    return Path(folder) / "README.md"


__all__ = ["write_file_card"]
