"""Validation drawings during distillation (``--validation_steps``).

* The prompts are encoded once, by the main process while its text encoders are on the device
  for the training data (:func:`encode_validation_prompts`), into ``validation/prompt_embeds.safetensors``
  in the output folder. During training no text encoder comes back to the GPU (T5-XXL alone is
  9.5 GB), and the processes that load none (every one but the main) draw from the same embeddings.
* Every process draws (:func:`draw_validation`): a student sharded by FSDP runs collectives in its
  forward, so all ranks must call it the same number of times; only the main one writes the grid.
  The VAE is on the device only while the images are drawn.
* The drawing runs under the run's autocast: the student's trainable copies are float32, its
  frozen parts and the VAE in the weight dtype, and Accelerate returns the student's output in
  float32, so without it a bf16 VAE refuses float32 latents.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from diffusers_hprune import toy
from diffusers_hprune.loading import TEXT_ENCODERS, components_on, negative_prompt, prompt_embeddings, sliced_decoding
from diffusers_hprune.pipelines.pruned import with_pruned_transformer
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_path, with_user_mode

FOLDER = "validation"
EMBEDS_FILE = "prompt_embeds.safetensors"


@torch.no_grad()
def encode_validation_prompts(pipe, family, prompts: list[str], settings: dict, output_dir: Path) -> Path:
    """Encode ``prompts`` (and the negative prompt ``settings`` names, or the family's default) into the output folder.

    Call on the main process with the text encoders on the device. Returns the file written.
    """
    from safetensors.torch import save_file

    max_len = int(settings.get("max_sequence_length", 256))
    negative = negative_prompt(pipe, settings)
    tensors = prompt_embeddings(pipe, list(prompts), max_len, None if negative is None else str(negative))
    path = Path(output_dir) / FOLDER / EMBEDS_FILE
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"prompts": json.dumps(list(prompts))})
        with_user_mode(tmp)  # safetensors creates the file 0600 whatever the umask
    return path


def load_validation_embeds(output_dir: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The embeddings :func:`encode_validation_prompts` wrote for exactly ``prompts`` (CPU, float32)."""
    from safetensors import safe_open

    path = Path(output_dir) / FOLDER / EMBEDS_FILE
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            written = json.loads((f.metadata() or {}).get("prompts", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError) as e:
        raise HPruneError(f"The validation prompts' embeddings {path} cannot be read ({e}); they are written when "
                          "the run starts: start it again.") from None
    if written != list(prompts):
        raise HPruneError(f"{path} holds the embeddings of other validation prompts; start the run again (it "
                          "writes them anew).")
    return tensors


def validation_pipeline(pipe, student):
    """The teacher pipeline's scheduler, VAE and tokenizers around ``student``, without text encoders (the prompts
    come encoded), so that the pipeline computes on the student's device."""
    drawing = with_pruned_transformer(pipe, student)
    drawing.register_modules(**{name: None for name in TEXT_ENCODERS if name in drawing.components})
    return drawing


@torch.no_grad()
def draw_validation(pipe, student, embeds: dict[str, torch.Tensor], settings: dict, seeds: list[int], *,
                    device, dtype: torch.dtype, autocast=None, path: Path | None = None) -> list:
    """Draw the validation prompts with ``student`` (on every process); write the grid to ``path`` when given.

    ``embeds`` from :func:`load_validation_embeds`; ``settings`` the pipeline call arguments (a negative prompt in
    them was encoded with the prompts); ``autocast`` the run's autocast context (default: none).
    """
    was_training = student.training
    student.eval()
    drawing = validation_pipeline(pipe, student)
    kwargs = {k: v for k, v in settings.items() if k != "negative_prompt"}
    kwargs.update({k: v.to(device, dtype) for k, v in embeds.items()})
    try:
        with components_on(drawing, device, ("vae",)), sliced_decoding(drawing), autocast or contextlib.nullcontext():
            generators = [torch.Generator(device).manual_seed(s) for s in seeds]
            images = drawing(generator=generators, **kwargs).images
    finally:
        student.train(was_training)
    if path is not None:
        toy.save_grid(images, path, columns=min(8, len(images)))
    return images


__all__ = ["EMBEDS_FILE", "FOLDER", "draw_validation", "encode_validation_prompts", "load_validation_embeds",
           "validation_pipeline"]
