"""One analysis's measurements: the full model draws the calibration prompts once (its block outputs cached), then
each entry's score without it (``velocity`` from the cache, image metrics from the ablated model's drawings)."""

from __future__ import annotations

from typing import Any

import torch

from diffusers_hprune.analysis.ablation import (
    BlockCache,
    BlockCounter,
    entry_plan,
    naive_outputs,
    normalised_error,
    record_transformer_calls,
    served_calls,
)
from diffusers_hprune.architecture import BLOCK, get_family
from diffusers_hprune.contributions import ContributionReport
from diffusers_hprune.loading import (
    TEXT_ENCODERS,
    call_default,
    components_on,
    generate,
    negative_prompt,
    prompt_embeddings,
    swapped_transformer,
    without_text_encoders,
)
from diffusers_hprune.metrics import OUTPUT, REFERENCE
from diffusers_hprune.pruning.surgery import prune_transformer


def base_config(transformer) -> dict[str, Any]:
    """The transformer's config as the unpruned model's (``_class_name`` is absent from models built in code)."""
    config = {k: v for k, v in dict(transformer.config).items() if k != "prune_plan"}
    config["_class_name"] = get_family(transformer).base_class_name
    return config


def encoded_pipeline(pipe, report: ContributionReport, batch_size: int, device=None):
    """``(drawing pipeline, embeddings)``: the calibration prompts encoded once, per batch of ``batch_size``, and
    ``pipe``'s pipeline without its text encoders, which draws from them.

    With ``device``, the text encoders compute there alone (then go back to the CPU), and only afterwards the
    transformer and the VAE move there: the text encoders (T5-XXL: 8.9 GiB) are never on the device beside the
    transformer. Without it every component stays where it is.
    """
    calibration = report.calibration
    prompts, kwargs = calibration["prompts"], calibration["generation"]
    max_len = int(kwargs.get("max_sequence_length", call_default(pipe, "max_sequence_length", 256)))
    negative = negative_prompt(pipe, kwargs)
    with components_on(pipe, device, TEXT_ENCODERS):
        embeds = [prompt_embeddings(pipe, prompts[start : start + batch_size], max_len, negative)
                  for start in range(0, len(prompts), batch_size)]
    if device is not None:
        pipe.transformer.to(device)
        pipe.vae.to(device)
    return without_text_encoders(pipe), embeds


class Measurement:
    """The full model's drawing of the calibration prompts (its block outputs cached) and each entry's score."""

    def __init__(self, pipe, report: ContributionReport, metric_def, scorer, align_scorer, method: str,
                 batch_size: int, counter: BlockCounter, embeds: list[dict] | None = None):
        self.pipe, self.transformer, self.report, self.embeds = pipe, pipe.transformer, report, embeds
        self.family = get_family(self.transformer)
        self.config = base_config(self.transformer)
        self.metric_def, self.scorer, self.align_scorer = metric_def, scorer, align_scorer
        self.method, self.batch_size, self.counter = method, batch_size, counter
        calibration = report.calibration
        self.prompts, self.seeds, self.gen_kwargs = calibration["prompts"], calibration["seeds"], calibration["generation"]
        self.steps = calibration["eval_steps"]
        self._image_baselines: list[float] | None = None
        self._subset_baselines: dict[int, float] = {}

    def _generate(self, on_step=None):
        return generate(self.pipe, self.prompts, self.seeds, self.gen_kwargs, self.batch_size, on_step,
                        embeds=self.embeds, tiled="vae_tile" in self.report.calibration)

    def draw_full_model(self, cache_device, max_cache_bytes: int | None) -> None:
        """The full model draws the calibration images; the inputs of its calls at the evaluated steps are recorded
        (the others are not kept) where the block cache lives; the baseline scores and block similarities follow."""
        transformer, report, counter = self.transformer, self.report, self.counter
        step, wanted, call_steps = [0], set(self.steps), []
        self.batch_starts = []  # the number of the first transformer call of each batch of prompts

        def on_step(i):
            step[0] = i
            if i == 0:
                self.batch_starts.append(len(call_steps))

        def tag(module, args, kwargs):
            call_steps.append(step[0])

        with torch.no_grad(), record_transformer_calls(transformer, keep=lambda: step[0] in wanted,
                                                       device=cache_device) as selected:
            handle = transformer.register_forward_pre_hook(tag, with_kwargs=True)
            try:
                self.images = self._generate(on_step)
            finally:
                handle.remove()
        self.selected = selected
        # The ablated model's first-step calls see exactly the full model's inputs: the cache serves them
        # (k: the call's number in a drawing of every prompt; j: its place among the recorded calls).
        self.first_step = [(c.step, j) for j, c in enumerate(selected) if call_steps[c.step] == 0]
        report.timesteps = sorted({float(c.kwargs["timestep"].flatten()[0]) for c in selected}, reverse=True)
        self.cache = BlockCache.build(transformer, selected, cache_device=cache_device, counter=counter,
                                      max_bytes=max_cache_bytes)
        report.similarity.update(self.cache.similarity)
        self.references = [c.output for c in selected] if self.metric_def.kind == OUTPUT else None
        if report.baseline_score is None:
            report.baseline_score = self._baseline()
        if report.alignment and report.alignment["baseline_score"] is None:
            report.alignment["baseline_score"] = float(self.align_scorer(self.images, self.prompts))

    def _baseline(self) -> float:
        if self.metric_def.kind == OUTPUT:  # removing nothing: through the cache (no block runs) or the whole model
            empty = self.family.empty_plan(self.config)
            base = (self.cache.ablated_outputs(empty, self.counter) if self.method == "cached"
                    else naive_outputs(self.transformer, empty, self.selected, self.counter))
            return 0.0 - normalised_error(base, self.references)
        return float(self.scorer(self.images, self.images if self.metric_def.kind == REFERENCE else self.prompts))

    def batch_slice(self, batch: int) -> slice:
        return slice(batch * self.batch_size, (batch + 1) * self.batch_size)

    def ablated_images(self, entry, batch: int | None = None):
        """The final images of the model without ``entry``, from the calibration noise and prompts (or those of
        batch number ``batch`` alone: the full model drew them in the same batch, so the cache serves the same
        first-step calls)."""
        ablated = prune_transformer(self.transformer, entry)
        first = self.first_step
        if batch is not None:  # the batch's calls, numbered from its first
            start = self.batch_starts[batch]
            stop = self.batch_starts[batch + 1] if batch + 1 < len(self.batch_starts) else float("inf")
            first = [(k - start, j) for k, j in first if start <= k < stop]
        served = {}
        if self.method == "cached" and first:
            outputs = self.cache.ablated_outputs(entry, self.counter, calls=[j for _, j in first])
            served = {k: out for (k, _), out in zip(first, outputs)}
        self.counter.attach(ablated)
        try:
            with swapped_transformer(self.pipe, ablated), served_calls(ablated, served):
                if batch is None:
                    return self._generate()
                part = self.batch_slice(batch)
                return generate(self.pipe, self.prompts[part], self.seeds[part], self.gen_kwargs, self.batch_size,
                                embeds=None if self.embeds is None else [self.embeds[batch]],
                                tiled="vae_tile" in self.report.calibration)
        finally:
            self.counter.detach()

    def _image_score(self, image, k: int) -> float:
        """The metric of image ``k`` of the calibration alone (against the full model's image ``k``, or its prompt)."""
        other = self.images[k] if self.metric_def.kind == REFERENCE else self.prompts[k]
        return float(self.scorer([image], [other]))

    def image_deltas(self, key, batch: int) -> list[float]:
        """dP of each image of batch ``batch`` without ``key``: the full model's score of the image less the
        ablated model's (an adaptive analysis's evidence; their mean over every image is the entry's dP)."""
        if self.metric_def.kind == OUTPUT:
            raise ValueError("Per-image dP needs an image metric; output metrics compare predictions, not images.")
        if self._image_baselines is None:  # the full model's score of each image, once
            self._image_baselines = [self._image_score(image, k) for k, image in enumerate(self.images)]
        i, c = key
        entry = entry_plan(self.family, self.config, i, tuple(c.split("+")))
        images = self.ablated_images(entry, batch)
        first = self.batch_slice(batch).start
        return [self._image_baselines[first + n] - self._image_score(image, first + n)
                for n, image in enumerate(images)]

    def _output_score(self, entry) -> float:
        if self.method == "cached":
            return 0.0 - normalised_error(self.cache.ablated_outputs(entry, self.counter), self.references)
        outputs = naive_outputs(self.transformer, entry, self.selected, self.counter)
        refs = self.references
        if self.method == "scratch":  # P(original) and P(ablated) each computed from scratch
            refs = naive_outputs(self.transformer, self.family.empty_plan(self.config), self.selected, self.counter)
        return 0.0 - normalised_error(outputs, refs)

    def measure(self, key) -> tuple[float | None, float | None]:
        """(P without ``key``, the alignment score without it): each None when not asked for."""
        i, c = key
        report = self.report
        entry = entry_plan(self.family, self.config, i, tuple(c.split("+")))
        main = key not in report.entries
        align = bool(report.alignment) and c == BLOCK and i not in report.alignment["blocks"]
        score = images_without = None
        if main and self.metric_def.kind == OUTPUT:
            score = self._output_score(entry)
        elif main:
            n = report.entry_images(key)  # a component entry may be measured on the first images only
            images_without = (self.ablated_images(entry) if n == len(self.prompts) else
                              [im for b in range(n // self.batch_size) for im in self.ablated_images(entry, b)])
            if self.metric_def.kind == REFERENCE:
                refs = self._generate() if self.method == "scratch" else self.images
                score = float(self.scorer(images_without, refs[:n]))
            else:
                score = float(self.scorer(images_without, self.prompts[:n]))
        alignment = None
        if align:
            images_without = images_without if images_without is not None else self.ablated_images(entry)
            alignment = float(self.align_scorer(images_without, self.prompts))
        return score, alignment

    def _baseline_of(self, n: int) -> float:
        """The full model's score of its first ``n`` images (every one: the report's baseline), scored once per ``n``:
        every component entry measured on the first images shares it."""
        if n == len(self.prompts):
            return self.report.baseline_score
        if n not in self._subset_baselines:
            other = self.images[:n] if self.metric_def.kind == REFERENCE else self.prompts[:n]
            self._subset_baselines[n] = float(self.scorer(self.images[:n], other))
        return self._subset_baselines[n]

    def record(self, key) -> None:
        """Measure ``key`` and put its score (and alignment score) into the report."""
        score, alignment = self.measure(key)
        report = self.report
        if score is not None:
            report.entries[key] = {"score": score, "delta": self._baseline_of(report.entry_images(key)) - score}
        if alignment is not None:
            report.alignment["blocks"][key[0]] = {
                "score": alignment, "delta": report.alignment["baseline_score"] - alignment}


__all__ = ["Measurement", "base_config"]
