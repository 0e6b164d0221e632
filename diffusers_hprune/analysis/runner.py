"""Contribution analysis (DESIGN.md section 6, step 1): dP(i, c) for every block i and component c.

``dP(i, c) = P(original) - P(model without component c of block i)`` on a calibration set of
prompts with fixed seeds, for ``c`` in ``{"block"} + the family's components`` (and, with
``pairs=True``, every pair of components of a block, written ``"a+b"``).

* Exact and as cheap as the metric allows: the full model runs once per recorded transformer
  call and every block's output is cached; an ablation of block ``i`` replays the cache for
  the blocks before ``i`` (:mod:`diffusers_hprune.analysis.ablation`). With the ``velocity``
  metric that is the whole ablated computation; with image metrics (``image_fidelity``,
  the default, and the scores of final images) the cache serves the ablated model's first
  denoising step and the later steps run (their inputs differ from the full model's).
* Optionally the whole-block dP of a text-image alignment score as well
  (``alignment_metric``: ``shapeeval`` on the toys, ``clip_score`` on real models), what the
  ``bk-sdm`` strategy ranks by; with an image main metric it scores the same images.
* Resumable: each finished entry is written atomically to ``<out>.parts/rank-<r>.json`` as
  it completes; a run started again with the same settings skips what is there.
* Sharded: under ``accelerate launch --num_processes N`` the missing entries are split
  across the processes and merged into ``<out>`` by the main process.

The result is a :class:`ContributionReport`, saved as ``analysis.json`` (docs/formats.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusers_hprune import toy
from diffusers_hprune.analysis.ablation import BlockCounter
from diffusers_hprune.analysis.adaptive import AdaptiveRun, StoppingRule, check_adaptive
from diffusers_hprune.analysis.measurement import Measurement, base_config, encoded_pipeline
from diffusers_hprune.analysis.parts import merged_result, parts_dir, resume, sync_parts
from diffusers_hprune.architecture import BLOCK, get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.contributions import AnalysisError, ContributionReport, components_fingerprint, fingerprint
from diffusers_hprune.loading import VAE_TILE, generation_settings, is_toy, load_pipeline
from diffusers_hprune.metrics import (
    ALIGNMENT_METRICS,
    DEFAULT_METRIC,
    OUTPUT,
    canonical_name,
    get_metric,
    metric_names,
)
from diffusers_hprune.profiles import identify
from diffusers_hprune.utils.distributed import DRAW_SECONDS_PER_STEP, lone_work_timeout, process_state
from diffusers_hprune.utils.errors import HPruneError

ANALYSIS_FORMAT = "diffusers-hprune/analysis"
ANALYSIS_FORMAT_VERSION = 1
METHODS = ("cached", "naive", "scratch")

# Generic calibration prompts for models other than the toys (varied objects, colours, counts, layouts).
DEFAULT_PROMPTS = (
    "a photo of a red bicycle leaning against a blue wall",
    "two cats sitting on a wooden bench in the sun",
    "a bowl of green apples on a kitchen table, soft morning light",
    "a lighthouse on a rocky coast under a stormy sky",
    "a yellow taxi to the left of a black umbrella on a city street",
    "an astronaut reading a book in a library, digital art",
    "three orange balloons floating above a snowy field",
    "a close-up portrait of an old fisherman with a white beard",
    "a watercolor painting of a mountain village at dusk",
    "a glass of water next to a purple flower in a vase",
    "a dog wearing sunglasses on a skateboard",
    "a plate of sushi on a black slate board, top view",
    "a small wooden cabin in a pine forest covered in snow",
    "a sign that says 'OPEN' in neon letters above a cafe door",
    "a steam locomotive crossing a stone bridge in autumn",
    "four blue cubes stacked on top of a white table",
)


def eval_step_indices(num_steps: int, eval_steps: int) -> list[int]:
    """``eval_steps`` denoising steps spread evenly over ``num_steps`` (first and last included)."""
    if eval_steps < 1:
        raise AnalysisError(f"--eval-steps must be at least 1, got {eval_steps}.")
    if eval_steps >= num_steps:
        return list(range(num_steps))
    return sorted({round(k * (num_steps - 1) / (eval_steps - 1)) for k in range(eval_steps)}) if eval_steps > 1 else [0]


#: What the process-group timeout of a sharded analysis is sized by besides ``DRAW_SECONDS_PER_STEP``: entries per
#: block (the block and its components).
ENTRIES_PER_BLOCK = 8


def shard_timeout(model, prompts: int, steps: int | None) -> timedelta:
    """How long a process of a sharded analysis waits at a barrier: longer than a whole shard takes.

    Ranks finish their shares at different times (entries differ in cost, a resumed run's are
    uneven) and wait for the slowest, then for the main process's merge; PyTorch's NCCL default
    (10 minutes) would end the job. Sized by :func:`~diffusers_hprune.utils.distributed.lone_work_timeout`
    of one process's share of every entry at ``DRAW_SECONDS_PER_STEP``.
    """
    try:
        if isinstance(model, (str, os.PathLike)):
            family = toy.name_of(str(model))
            config = load_transformer_config(toy.model_path(family) if family else model)
        else:
            config = dict(model.transformer.config)
        blocks = get_family(config).num_blocks(config)
    except (HPruneError, OSError, ValueError, TypeError, KeyError, AttributeError):
        blocks = 60  # unreadable here: FLUX.1's 57 blocks
    if steps is None:
        profile, _ = identify(model)
        steps = profile.num_inference_steps if profile is not None else 28
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    share = math.ceil(blocks * ENTRIES_PER_BLOCK / max(world, 1))
    return lone_work_timeout(share * prompts * steps * DRAW_SECONDS_PER_STEP)


def analyze(
    model,
    out: str | os.PathLike | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    metric_options: Mapping[str, Any] | None = None,
    alignment_metric: str | None = None,
    alignment_options: Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 8,
    seed: int = 0,
    num_inference_steps: int | None = None,
    eval_steps: int = 4,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    pairs: bool = False,
    method: str = "cached",
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    cache_device: str | torch.device | None = None,
    max_cache_bytes: int | None = None,
    progress: bool = True,
    vae_tiling: bool = False,
    stopping: StoppingRule | None = None,
    min_images: int | None = None,
    confidence: float = 0.95,
    component_images: int | None = None,
) -> ContributionReport:
    """Measure dP for every block and component of an SD3/FLUX pipeline's transformer.

    Args:
        model: a pipeline, a pipeline folder or Hub repo id, or a toy name (``sd3``, ``flux``). A pipeline on an
            accelerator computes where it is; one on the host (or loaded here) computes on this process's device:
            its prompts are encoded there first, then its transformer and VAE move there (and stay).
        out: the ``analysis.json`` to write; also where a stopped run resumes from.
        metric: a name from :mod:`diffusers_hprune.metrics` (``image_fidelity`` (default), ``velocity``,
            ``shapeeval``, ``clip_score``, ``hpsv2``).
        metric_options: options of the metric (e.g. ``{"model": "path/to/clip"}`` for clip_score).
        alignment_metric: also measure every whole block's dP with this text-image alignment score
            (``shapeeval``, ``clip_score``): what the ``bk-sdm`` strategy ranks by. ``"auto"``: ShapeEval on
            the toys, CLIP score elsewhere. Default: none (a main metric that is an alignment score serves).
        alignment_options: options of the alignment metric.
        prompts: calibration prompts; default: ``n_prompts`` of the toy's training prompts for the
            toys, else of a built-in varied list.
        seed: image ``k`` is drawn with seed ``seed + k``.
        num_inference_steps, height, width, guidance_scale: calibration generation (default:
            the toy's settings, or the pipeline's defaults with 28 steps).
        eval_steps: denoising steps at which the velocity metric compares predictions (and whose
            block outputs are cached; the koala similarity is measured there too).
        pairs: also measure every pair of components of a block removed together.
        method: ``cached`` (default); ``naive`` rebuilds and runs the whole ablated model per
            entry (full model's outputs computed once); ``scratch`` also recomputes the full
            model's outputs for every entry. The latter two are for verification and benchmarks
            and give the same numbers.
        overwrite: start again, replacing an existing ``out`` of other settings.
        dtype: weights and activations (default float32 on CPU, bfloat16 on GPU).
        cache_device: where the cached block outputs live (default: with the model; ``"cpu"``
            keeps them in host memory, for large models at high resolution).
        vae_tiling: decode every image in tiles (``loading.sliced_decoding``): a quarter of one 1024 px image's
            decode memory, for a model that barely fits the GPU (FLUX.1-schnell on 24 GB). The images differ a
            little from whole decodes, so it is part of the calibration (another analysis).
        max_cache_bytes: refuse (``AnalysisError``, before the cache is built past its first call)
            a block-output cache larger than this; ``None``: no bound. The size is reported either way.
        stopping: an adaptive analysis (:mod:`.adaptive`): each entry is measured on ``min_images`` images, then
            batch by batch while ``stopping`` (``planning.PlanDecisions``) says its dP could still change a plan, up
            to every calibration image. Image metrics only. ``None`` (default): every entry on every image.
        min_images: the images every entry of an adaptive analysis gets first (default: one batch, ``batch_size``).
        confidence: of the interval an adaptive analysis keeps around each dP (default 0.95).
        component_images: measure component (and pair) entries on the first this many calibration images only (a
            multiple of ``batch_size``; image metrics), as the paper does (80 of its 400); default: all.
    """
    if method not in METHODS:
        raise AnalysisError(f"Unknown analysis method {method!r}; choose one of {', '.join(METHODS)}.")
    state = process_state(shard_timeout(model, len(prompts) if prompts is not None else n_prompts,
                                        num_inference_steps))
    if out is None and state.num_processes > 1:
        raise AnalysisError("A sharded analysis (several processes) needs an output file (--out) to merge into.")
    metric_def = get_metric(metric)
    metric = canonical_name(metric)
    if stopping is not None:
        check_adaptive(metric_def, alignment_metric, method, min_images, confidence)
    scorer = metric_def.build(**dict(metric_options or {}))
    dtype = dtype or (torch.float32 if state.device.type == "cpu" else torch.bfloat16)
    pipe, model_name = load_pipeline(model, None, dtype)  # on the CPU until its prompts are encoded (see below)
    _refuse_pruned(pipe.transformer, model_name)
    alignment_metric, align_scorer = _alignment_scorer(alignment_metric, alignment_options, is_toy(pipe))
    prompts = _calibration_prompts(prompts, n_prompts, seed, is_toy(pipe))
    gen_kwargs = generation_settings(pipe, num_inference_steps, height, width, guidance_scale)
    report = _new_report(pipe, model_name, {"name": metric, "options": dict(metric_options or {})}, prompts, seed,
                         gen_kwargs, eval_step_indices(gen_kwargs["num_inference_steps"], eval_steps), batch_size,
                         dtype, pairs, vae_tiling, _component_images(component_images, prompts, batch_size, metric_def))
    if alignment_metric is not None:
        report.alignment = {"metric": {"name": alignment_metric, "options": dict(alignment_options or {})},
                            "baseline_score": None, "blocks": {}}
    out = Path(out) if out is not None else None
    resume(report, out, overwrite, state)
    if stopping is None:  # every entry on every image: one an adaptive run stopped early is measured again
        report.entries = {k: v for k, v in report.entries.items() if not report.stopped_early(k)}
    reused = len(report.entries)
    part = parts_dir(out) / f"rank-{state.process_index}.json" if out is not None else None
    counter, started = BlockCounter(), time.perf_counter()
    checkpoint = functools.partial(_save_part, report, part, counter, started)
    measurement = _LazyMeasurement(lambda: _measurement(pipe, report, state, metric_def, scorer, align_scorer, method,
                                                        batch_size, counter, cache_device, max_cache_bytes))
    if _needs_drawing(report):
        measurement()
    if stopping is None:
        mine, adaptive = _entries_to_measure(report)[state.process_index :: state.num_processes], {}
        _measure_all(measurement, mine, report, checkpoint, progress and state.is_main_process)
    else:
        run = AdaptiveRun(measurement, report, stopping, min_images=min_images or batch_size, confidence=confidence,
                          state=state, checkpoint=checkpoint, progress=progress,
                          sync=lambda: sync_parts(report, part, state))
        run.run(report.expected_keys())
        mine, adaptive = run.measured, {"adaptive": run.summary()}
    if metric_def.alignment and not report.alignment:
        _alignment_from_entries(report)
    report.run = {"method": method, "processes": state.num_processes, "reused_entries": reused,
                  "cache_bytes": measurement.cache_bytes, "computed_entries": len(mine),
                  "block_evaluations": counter.count, "seconds": round(time.perf_counter() - started, 3), **adaptive}
    return report if out is None else merged_result(report, out, part, state)


def _needs_drawing(report: ContributionReport) -> bool:
    """Whether the full model's drawing is needed whatever is measured: a baseline or similarity is missing."""
    return report.baseline_score is None or len(report.similarity) < report.num_blocks or bool(
        report.alignment and report.alignment["baseline_score"] is None)


def _alignment_from_entries(report: ContributionReport) -> None:
    """The main metric is an alignment score: its whole-block entries are what bk-sdm ranks by."""
    report.alignment = {"metric": dict(report.metric), "baseline_score": report.baseline_score,
                        "blocks": {i: {"score": v["score"], "delta": v["delta"]}
                                   for (i, c), v in report.entries.items() if c == BLOCK}}


def _measurement(pipe, report: ContributionReport, state, metric_def, scorer, align_scorer, method: str,
                 batch_size: int, counter: BlockCounter, cache_device, max_cache_bytes: int | None) -> Measurement:
    """The calibration prompts encoded, and the full model's drawing of them (its block outputs cached)."""
    # the text encoders and the transformer never on the device together (a pipeline on an accelerator stays put)
    drawing, embeds = encoded_pipeline(pipe, report, batch_size, state.device if _on_host(pipe) else None)
    measurement = Measurement(drawing, report, metric_def, scorer, align_scorer, method, batch_size, counter,
                              embeds=embeds)
    measurement.draw_full_model(cache_device, max_cache_bytes)
    return measurement


class _LazyMeasurement:
    """A :class:`Measurement` made when first needed: a run with nothing left to measure draws nothing."""

    def __init__(self, make):
        self.make, self.made = make, None

    def __call__(self) -> Measurement:
        if self.made is None:
            self.made = self.make()
        return self.made

    @property
    def cache_bytes(self) -> int:
        return self.made.cache.nbytes if self.made is not None else 0


def _measure_all(measurement, keys, report: ContributionReport, checkpoint, progress: bool) -> None:
    """Every entry of ``keys`` on every calibration image, each checkpointed as it completes."""
    if not keys:
        return
    measuring = measurement()
    bar = tqdm(keys, desc=f"analysis ({report.metric['name']})", unit="entry", disable=not progress)
    for key in bar:
        measuring.record(key)
        bar.set_postfix_str(f"block {key[0]} {key[1]}")
        checkpoint()


def _save_part(report: ContributionReport, part: Path | None, counter: BlockCounter, started: float) -> None:
    """This process's entries saved to its part file (if the analysis has an ``out``), with the run's cost so far
    as ``run``: what an interrupted run spent."""
    if part is not None:
        report.run = {"block_evaluations": counter.count, "seconds": time.perf_counter() - started}
        report.save(part)


def _on_host(pipe) -> bool:
    """Whether ``pipe``'s transformer is on the CPU: loaded here, or handed over there (``hprune compress``'s teacher),
    it computes on this process's device once its prompts are encoded."""
    return next(pipe.transformer.parameters()).device.type == "cpu"


def _refuse_pruned(transformer, model_name: str) -> None:
    plan = getattr(transformer, "prune_plan", None)
    if plan is not None and not plan.is_empty:
        raise AnalysisError(
            f"{model_name} is already pruned ({plan.describe()}); analyse the original model, whose contributions the "
            "planner needs."
        )


def _alignment_scorer(alignment_metric: str | None, options: Mapping[str, Any] | None, toy_model: bool):
    """(the alignment metric's name, its scorer), or (None, None) when none is asked for."""
    if alignment_metric == "auto":
        alignment_metric = ALIGNMENT_METRICS["toy" if toy_model else "model"]
    if alignment_metric is None:
        return None, None
    align_def = get_metric(alignment_metric)
    alignment_metric = canonical_name(alignment_metric)
    if not align_def.alignment:
        raise AnalysisError(
            f"--alignment-metric {alignment_metric} is not a text-image alignment score; choose one of "
            f"{', '.join(n for n in metric_names() if get_metric(n).alignment)}."
        )
    return alignment_metric, align_def.build(**dict(options or {}))


def _calibration_prompts(prompts: Sequence[str] | None, n_prompts: int, seed: int, toy_model: bool) -> list[str]:
    if prompts is None:
        if n_prompts < 1:
            raise AnalysisError(f"--n-prompts must be at least 1, got {n_prompts}.")
        prompts = toy.prompts(split="train", n=n_prompts, seed=seed) if toy_model else list(
            itertools.islice(itertools.cycle(DEFAULT_PROMPTS), n_prompts))
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise AnalysisError("The calibration prompt list is empty; give at least one prompt.")
    return prompts


def _component_images(count: int | None, prompts: list[str], batch_size: int, metric_def) -> int | None:
    """The images component entries are measured on, where fewer than all (else None); checked."""
    if count is None or count >= len(prompts):
        return None
    if metric_def.kind == OUTPUT:
        raise AnalysisError(f"--component-images counts images; the {metric_def.name} metric compares predictions at "
                            "every calibration prompt. Drop --component-images, or choose an image metric.")
    if count < 1 or count % batch_size:
        raise AnalysisError(f"--component-images must be a positive multiple of --batch-size {batch_size} (component "
                            f"entries are drawn in the full model's batches), got {count}.")
    return count


def _new_report(pipe, model_name: str, metric: dict, prompts: list[str], seed: int, gen_kwargs: dict,
                steps: list[int], batch_size: int, dtype: torch.dtype, pairs: bool,
                vae_tiling: bool = False, component_images: int | None = None) -> ContributionReport:
    """An empty report of this model, metric and calibration (what a resumed run must share; tiled decoding is
    named only when on, so a report written before it existed is the same calibration)."""
    transformer = pipe.transformer
    family = get_family(transformer)
    config = base_config(transformer)
    return ContributionReport(
        family=family.name,
        num_blocks=family.num_blocks(config),
        model=model_name,
        fingerprint=fingerprint(transformer),
        components=components_fingerprint(pipe),  # text encoders, VAE, tokenizers, scheduler change the images too
        transformer_config=json.loads(json.dumps(config, default=str)),
        metric=metric,
        calibration={"prompts": prompts, "seeds": [seed + k for k in range(len(prompts))], "generation": gen_kwargs,
                     "eval_steps": steps, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
                     **({"vae_tile": VAE_TILE} if vae_tiling else {}),
                     **({"component_images": component_images} if component_images else {})},
        pairs=pairs,
    )


def _entries_to_measure(report: ContributionReport) -> list[tuple[int, str]]:
    """The entries still missing, in the report's order; whole blocks whose alignment dP is missing too."""
    todo = [k for k in report.expected_keys() if k not in report.entries]
    if report.alignment:  # whole blocks whose alignment dP is missing (their main entry may be there)
        todo += [(i, BLOCK) for i in range(report.num_blocks)
                 if i not in report.alignment["blocks"] and (i, BLOCK) not in todo]
        todo.sort(key=report.expected_keys().index)
    return todo


