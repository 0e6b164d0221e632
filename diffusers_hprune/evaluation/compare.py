"""Teacher / student evaluation: quality metrics, weight bytes, step memory and latency (``hprune evaluate``).

Every pipeline draws the same prompts with the same seeds and generation settings. Per model:
the image metrics asked for (from the metric registry: ``shapeeval`` on the toys, ``clip_score``,
``hpsv2``, or a user's), the parameter count, the bytes its transformer holds, the peak memory of
one denoising step and its latency (``measure``: warm-up, then median and spread of ``repeats``
steps, all models on the same step inputs). With a student: ``fidelity`` to the teacher (PSNR of
the student's images against the teacher's, and SSIM when torchmetrics is installed), the
student's figures relative to the teacher's, and a PNG grid, teacher row over student row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusers_hprune import toy
from diffusers_hprune.architecture import get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.evaluation.measure import (
    compute_dtype,
    device_description,
    logical_params,
    step_flops,
    step_inputs,
    step_latency,
    step_memory,
    stored_bytes,
)
from diffusers_hprune.loading import (
    TEXT_ENCODERS,
    call_default,
    check_weight_files,
    components_on,
    generate,
    generation_settings,
    load_pipeline,
    negative_prompt,
    pipeline_folder,
    prompt_embeddings,
    without_text_encoders,
)
from diffusers_hprune.metrics import IMAGE, get_metric
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.pipelines import with_pruned_transformer
from diffusers_hprune.utils.checks import check_number
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.quant_config import is_bitsandbytes, quantization_method

FIDELITY = "fidelity"


class EvaluationError(HPruneError):
    """Pipelines that cannot be compared, or options that do not fit."""


def psnr(images: list, references: list) -> float:
    """Mean PSNR (dB, 8-bit pixels) of ``images`` against ``references``; identical images count as 100 dB."""
    values = []
    for a, b in zip(images, references):
        a = np.asarray(a.convert("RGB"), dtype=np.float64)
        b = np.asarray(b.convert("RGB"), dtype=np.float64)
        mse = float(np.mean((a - b) ** 2))
        values.append(100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(values))


def ssim(images: list, references: list) -> float | None:
    """Mean SSIM (torchmetrics) or ``None`` when torchmetrics is not installed."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        return None

    def batch(ims):
        return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                            for i in ims])

    a, b = batch(images), batch(references)
    kernel = min(11, a.shape[-1] - (1 - a.shape[-1] % 2), a.shape[-2] - (1 - a.shape[-2] % 2))
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))


def _cost(pipe, inputs: dict, repeats: int, warmup: int) -> dict[str, Any]:
    transformer = pipe.transformer
    memory = step_memory(transformer, inputs)
    latency = step_latency(transformer, inputs, warmup=warmup, repeats=repeats)
    return {
        "params": logical_params(transformer),
        "weight_bytes": stored_bytes(transformer),
        "step_peak_bytes": memory["peak"],
        "memory_method": memory["method"],
        "latency_s": {k: latency[k] for k in ("median", "stdev", "iqr", "min", "max", "warmup", "repeats")},
        "step_flops": step_flops(transformer, inputs),
        "weights": quantization_method(transformer.config) or str(compute_dtype(transformer)).replace("torch.", ""),
    }


def _is_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes-quantised model (it stays where bitsandbytes put it; a torchao one moves like any other)."""
    quantizer = getattr(module, "hf_quantizer", None)
    if quantizer is not None:
        return is_bitsandbytes({"quantization_config": quantizer.quantization_config})
    return is_bitsandbytes(getattr(module, "config", {}))


def _modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _park(modules, device: torch.device) -> None:
    """Move the ``modules`` that are on ``device`` (an accelerator) to the CPU; 4-bit ones stay where bitsandbytes
    placed them (they are small, and cannot move)."""
    if device.type == "cpu":
        return
    for module in modules:
        if not _is_4bit(module) and _device_of(module) == device:
            module.to("cpu")


def to_host(pipe) -> None:
    """Every module of ``pipe`` on the CPU, but 4-bit ones (they stay where bitsandbytes put them)."""
    for module in _modules(pipe):
        if not _is_4bit(module):
            module.to("cpu")


def _park_others(loaded: list, current, device: torch.device) -> None:
    """Move off ``device`` every module of the pipelines in ``loaded`` other than ``current`` that ``current`` does not
    share (a student beside its teacher shares the text encoders and VAE): one transformer on the GPU at a time."""
    keep = {id(m) for m in _modules(current)}
    for other in loaded:
        if other is not current:
            _park([m for m in _modules(other) if id(m) not in keep], device)


def _encoders(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, n, None) for n in TEXT_ENCODERS) if isinstance(m, torch.nn.Module)]


def _encode(pipe, prompts, kwargs, batch_size, device: torch.device, step: dict | None):
    """``(embeddings per batch, step inputs or None)``: the prompts encoded on ``device`` by the text encoders alone
    there (on an accelerator the pipeline's other modules leave it first, and the encoders go back to the CPU
    afterwards); ``step``: the arguments of :func:`step_inputs`, whose text is encoded at the same time."""
    max_len = int(kwargs.get("max_sequence_length", call_default(pipe, "max_sequence_length", 256)))
    negative = negative_prompt(pipe, kwargs)
    encoders = {id(m) for m in _encoders(pipe)}
    _park([m for m in _modules(pipe) if id(m) not in encoders], device)
    with components_on(pipe, None if device.type == "cpu" else device, TEXT_ENCODERS):
        embeds = [prompt_embeddings(pipe, list(prompts[start : start + batch_size]), max_len, negative)
                  for start in range(0, len(prompts), batch_size)]
        inputs = None if step is None else step_inputs(pipe, prompts[0], **step)
    return embeds, inputs


def _draw(pipe, prompts, seeds, kwargs, batch_size, embeds, device: torch.device, tiled: bool = False) -> list:
    """The pipeline's transformer and VAE on ``device`` (4-bit ones stay where bitsandbytes put them), drawing from
    the embeddings without its text encoders."""
    encoders = {id(m) for m in _encoders(pipe)}
    for module in _modules(pipe):
        if id(module) not in encoders and not _is_4bit(module) and _device_of(module) != device:
            module.to(device)
    return generate(without_text_encoders(pipe), prompts, seeds, kwargs, batch_size, embeds=embeds, tiled=tiled)


def evaluate_pipelines(
    models: dict[str, Any],
    prompts: list[str],
    *,
    seed: int = 0,
    metrics: tuple[str, ...] | list[str] = (),
    metric_options: dict[str, dict] | None = None,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    cost: bool = True,
    latency_repeats: int = 10,
    warmup: int = 2,
    grid: str | os.PathLike | None = None,
    grid_size: int = 16,
    device: str | torch.device | None = None,
    vae_tiling: bool = False,
) -> dict[str, Any]:
    """Evaluate pipelines (``{"teacher": pipe, "student": pipe}`` or one of them) on ``prompts``.

    The first entry is the reference: ``fidelity`` and the ``relative`` figures compare every
    other one with it. ``grid``: a PNG with one row per pipeline, the first ``grid_size``
    prompts. Returns the result dictionary that ``hprune evaluate`` writes.

    Every pipeline computes on ``device`` (default: where the first one's transformer is; a first pipeline on the
    host computes on the GPU when there is one), one model there at a time: a value may be a function returning
    the pipeline, called when its turn comes; at each turn the modules of the other pipelines that this one does
    not share go to the CPU (and stay there), then this pipeline's text encoders encode its prompts on the device
    alone (its transformer and VAE wait on the CPU) and go back to the CPU, and only then its transformer and VAE
    come to the device to draw, the VAE decoding one image at a time. 4-bit modules stay where bitsandbytes put
    them. ``vae_tiling``: every image decoded in tiles (``loading.sliced_decoding``). The budget's ``evaluation``
    stage models this.
    """

    if not models:
        raise EvaluationError("Nothing to evaluate: give at least one pipeline.")
    if not prompts:
        raise EvaluationError("The prompt list is empty; give at least one prompt.")
    for name, value, minimum in (("--batch-size", batch_size, 1), ("--latency-repeats", latency_repeats, 1),
                                 ("--warmup", warmup, 0), ("--grid-size", grid_size, 1), ("--seed", seed, 0)):
        check_number(name, value, kind=int, minimum=minimum, error=EvaluationError)
    names = list(models)
    reference = models[names[0]] if hasattr(models[names[0]], "components") else None
    pipelines = _Pipelines(models, _compute_device(device, reference))
    reference = pipelines.get(names[0])
    family = get_family(reference.transformer)
    scorers = _image_scorers(metrics, metric_options)
    kwargs = generation_settings(reference, num_inference_steps, height, width, guidance_scale)
    seeds = [seed + k for k in range(len(prompts))]
    result: dict[str, Any] = {"prompts": list(prompts), "seed": seed, "generation": kwargs, "models": {},
                              **({"vae_tiling": True} if vae_tiling else {}),
                              **({"device": device_description(pipelines.device)} if cost else {})}
    inputs = None
    # no size given: the model's own
    step = dict(height=kwargs.get("height"), width=kwargs.get("width"), guidance_scale=guidance_scale, seed=seed)
    images = {}
    for name in names:
        pipe = pipelines.get(name)
        other = get_family(pipe.transformer)
        if other is not family:
            raise EvaluationError(f"{name} is a {other.display_name} pipeline but {names[0]} is {family.display_name}; "
                                  "compare a student with its own teacher.")
        _park_others(list(pipelines.loaded.values()), pipe, pipelines.device)
        embeds, first = _encode(pipe, prompts, kwargs, batch_size, pipelines.device,
                                step if cost and inputs is None else None)
        inputs = first if inputs is None else inputs
        images[name] = _draw(pipe, prompts, seeds, kwargs, batch_size, embeds, pipelines.device, vae_tiling)
        entry: dict[str, Any] = {"source": str(getattr(pipe, "name_or_path", "") or name),
                                 "prune_plan": _plan_text(pipe.transformer),
                                 "metrics": _scores(scorers, images[name], prompts)}
        if cost:
            entry.update(_cost(pipe, _inputs_for(pipe, inputs), latency_repeats, warmup))
        result["models"][name] = entry
        del pipe
        pipelines.done(name)
    for name in names[1:]:
        entry = result["models"][name]
        if FIDELITY in metrics or not metrics:
            entry["fidelity"] = {"psnr_db": psnr(images[name], images[names[0]]),
                                 "ssim": ssim(images[name], images[names[0]])}
        entry["relative"] = _relative(entry, result["models"][names[0]])
    if grid is not None:
        k = max(1, min(grid_size, len(prompts)))
        toy.save_grid([im for name in names for im in images[name][:k]], grid, columns=k)
        result["grid"] = str(grid)
    return result


def _compute_device(device, reference) -> torch.device:
    """Where the pipelines compute: ``device`` when given; else where the first pipeline's transformer is, unless
    that is the host and there is a GPU (a pipeline loaded for evaluation waits on the host)."""
    if device is not None:
        return torch.device(device)
    if reference is not None and _device_of(reference.transformer).type != "cpu":
        return _device_of(reference.transformer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Pipelines:
    """The pipelines to evaluate, each loaded when its turn comes: one given as a function is called then, with the
    other transformers off the GPU first."""

    def __init__(self, models: dict[str, Any], device: torch.device):
        self.models, self.loaded, self.device = models, {}, device

    def get(self, name: str):
        if name not in self.loaded:
            value = self.models[name]
            if not hasattr(value, "components"):
                for other in self.loaded.values():
                    _park([other.transformer], self.device)
                value = value()
            self.loaded[name] = value
        return self.loaded[name]

    def done(self, name: str) -> None:
        """Drop a pipeline this object loaded (from a function) once its turn is over, but the reference: its
        transformer need not wait in host memory beside the next one (three FLUX.1 transformers would not fit)."""
        if name != next(iter(self.models)) and not hasattr(self.models[name], "components"):
            self.loaded.pop(name, None)


def _image_scorers(metrics, metric_options: dict[str, dict] | None) -> dict[str, Any]:
    """metric name -> its scorer, for the image metrics asked for (fidelity compares pipelines instead)."""
    scorers = {}
    for metric in metrics:
        if metric == FIDELITY:
            continue
        spec = get_metric(metric)
        if spec.kind != IMAGE:
            raise EvaluationError(f"The {metric} metric scores an ablation inside the analysis, not images; use "
                                  f"{FIDELITY!r} (student vs teacher images) or an image metric here.")
        scorers[metric] = spec.build(**(metric_options or {}).get(metric, {}))
    return scorers


def _scores(scorers: dict[str, Any], images, prompts: list[str]) -> dict[str, Any]:
    """Every image metric of one pipeline's images; ShapeEval with its whole breakdown (per category, attribute)."""
    return {metric: toy.shapeeval(images, prompts) if metric == "shapeeval" else float(scorer(images, prompts))
            for metric, scorer in scorers.items()}


def _inputs_for(pipe, inputs: dict) -> dict:
    """The reference's transformer inputs on this pipeline's device, floating ones in its compute dtype."""
    dtype, device = compute_dtype(pipe.transformer), _device_of(pipe.transformer)
    return {k: (v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def _plan_text(transformer) -> str:
    plan = getattr(transformer, "prune_plan", None)
    return "" if plan is None or plan.is_empty else plan.describe()


def overall_score(value) -> float | None:
    """A metric's single number: ``value`` itself, or its ``overall`` entry for a breakdown (ShapeEval)."""
    if isinstance(value, dict):
        return value.get("overall")
    return value


def _relative(entry: dict, base: dict) -> dict[str, float]:
    out = {}
    for key in ("params", "weight_bytes", "step_peak_bytes"):
        if key in entry and base.get(key):
            out[key] = entry[key] / base[key]
    if "latency_s" in entry:
        out["latency"] = entry["latency_s"]["median"] / base["latency_s"]["median"]
    if entry.get("step_flops") and base.get("step_flops"):  # the latency share the FLOP reduction alone would give
        out["flop_bound"] = entry["step_flops"] / base["step_flops"]
    for metric, value in entry["metrics"].items():
        b = overall_score(base["metrics"].get(metric))
        if b:
            out[metric] = overall_score(value) / b
    return out


def load_for_evaluation(model: str | os.PathLike, device: str | None = None):
    """A pipeline by folder, cached Hub id or toy name, on the host in the dtype it computes in on ``device``
    (default: the GPU when there is one): fp32 for the CPU, bf16 for a GPU. :func:`evaluate_pipelines` moves each
    component to the device when it computes (a 4-bit transformer is where bitsandbytes put it)."""

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    pipe, _ = load_pipeline(model, None, dtype)
    return pipe


def shares_components(teacher_folder, folder) -> bool:
    """Whether the pipeline folder ``folder`` holds its teacher's files for every component but the transformer
    (as ``hprune distill`` and ``hprune quantize`` write them): byte for byte, the same files in each folder."""
    import filecmp

    teacher_folder, folder = Path(teacher_folder), Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or entry[0] is None:
            continue
        mine, theirs = folder / name, teacher_folder / name
        if not (mine.is_dir() and theirs.is_dir()):
            return False
        files = sorted(p.relative_to(mine) for p in mine.rglob("*") if p.is_file())
        if files != sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()):
            return False
        if not all(filecmp.cmp(mine / f, theirs / f, shallow=False) for f in files):
            return False
    return True


def load_student(teacher, teacher_model, student: str | os.PathLike):
    """The student pipeline ``student`` for evaluation beside ``teacher`` (loaded from ``teacher_model``): built
    around the teacher's own text encoders and VAE when its folder holds the same files (one T5 in memory, not
    two), else loaded whole like the teacher."""
    teacher_folder, folder = pipeline_folder(teacher_model), pipeline_folder(student)
    if teacher_folder is not None and folder is not None and shares_components(teacher_folder, folder):
        return load_student_beside(teacher, folder)
    return load_for_evaluation(student)


def load_student_beside(teacher, folder: str | os.PathLike):
    """The pruned pipeline of ``folder`` built around its transformer alone, sharing ``teacher``'s other components.

    For a student whose text encoders, VAE and scheduler are its teacher's (as ``hprune distill``
    and ``hprune quantize`` write them): one copy of those in memory, and only the student's
    transformer is loaded (in the teacher's dtype, on its device; an NF4 one where bitsandbytes
    puts it).
    """
    folder = Path(folder)
    config = load_transformer_config(folder)
    check_weight_files(folder / "transformer", "transformer weights")
    dtype = compute_dtype(teacher.transformer)
    transformer = pruned_class_for(get_family(config)).from_pretrained(folder / "transformer", dtype=dtype)
    if not is_bitsandbytes(config):
        transformer.to(next(teacher.transformer.parameters()).device)
    student = with_pruned_transformer(teacher, transformer)
    student.register_to_config(_name_or_path=str(folder))
    return student


__all__ = ["EvaluationError", "evaluate_pipelines", "load_for_evaluation", "load_student", "load_student_beside",
           "overall_score", "psnr", "shares_components", "ssim", "to_host"]
