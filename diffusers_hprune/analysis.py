"""Contribution analysis (DESIGN.md section 6, step 1): dP(i, c) for every block i and component c.

``dP(i, c) = P(original) - P(model without component c of block i)`` on a calibration set of
prompts with fixed seeds, for ``c`` in ``{"block"} + the family's components`` (and, with
``pairs=True``, every pair of components of a block, written ``"a+b"``).

* Exact and cheap: with the default ``fidelity`` metric the full model runs once per
  recorded transformer call and every block's output is cached; an ablation of block ``i``
  replays the cache for the blocks before ``i`` (:mod:`diffusers_hprune.ablation`).
* Resumable: each finished entry is written atomically to ``<out>.parts/rank-<r>.json`` as
  it completes; a run started again with the same settings skips what is there.
* Sharded: under ``accelerate launch --num_processes N`` the missing entries are split
  across the processes and merged into ``<out>`` by the main process.

The result is a :class:`ContributionReport`, saved as ``analysis.json`` (docs/formats.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import BLOCK, ModelFamily, get_family
from .distributed import process_state
from .errors import HPruneError
from .fileio import atomic_write_json

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


class AnalysisError(HPruneError):
    """A missing, corrupt or mismatched analysis file, or analysis settings that cannot work."""


def component_keys(family: ModelFamily, config: Mapping[str, Any], pairs: bool = False) -> list[tuple[int, str]]:
    """Every ``(block, component)`` the analysis measures, in canonical order."""
    keys = []
    for spec in family.block_specs(config):
        keys.append((spec.index, BLOCK))
        keys += [(spec.index, c) for c in spec.components]
        if pairs:
            keys += [(spec.index, f"{a}+{b}") for a, b in itertools.combinations(spec.components, 2)]
    return keys


def _key(entry: Mapping[str, Any]) -> tuple[int, str]:
    return int(entry["block"]), str(entry["component"])


@dataclass
class ContributionReport:
    """The result of a contribution analysis (the ``analysis.json`` file).

    ``entries`` maps ``(block index, component)`` to ``{"score": P(ablated), "delta": dP}``;
    ``similarity`` maps a block index to the cosine similarity of its input and output in
    the full model (what the ``koala`` strategy ranks by).
    """

    family: str
    num_blocks: int
    model: str
    fingerprint: str
    transformer_config: dict[str, Any]
    metric: dict[str, Any]
    calibration: dict[str, Any]
    pairs: bool = False
    baseline_score: float | None = None
    entries: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------
    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.transformer_config)

    def expected_keys(self) -> list[tuple[int, str]]:
        return component_keys(self.model_family, self.transformer_config, self.pairs)

    @property
    def complete(self) -> bool:
        return self.baseline_score is not None and all(k in self.entries for k in self.expected_keys())

    def contributions(self, pairs: bool = False) -> dict[tuple[int, str], float]:
        """``(block, component) -> dP``; pair entries (``"a+b"``) only with ``pairs=True``."""
        return {k: v["delta"] for k, v in self.entries.items() if pairs or "+" not in k[1]}

    def settings(self) -> dict[str, Any]:
        """What must match for two runs to share entries (model, metric, calibration, pairs)."""
        return {
            "family": self.family,
            "num_blocks": self.num_blocks,
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "calibration": self.calibration,
            "pairs": self.pairs,
        }

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        order = {k: n for n, k in enumerate(self.expected_keys())}
        entries = sorted(self.entries.items(), key=lambda kv: order.get(kv[0], len(order)))
        return {
            "format": ANALYSIS_FORMAT,
            "format_version": ANALYSIS_FORMAT_VERSION,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "calibration": self.calibration,
            "pairs": self.pairs,
            "complete": self.complete,
            "baseline_score": self.baseline_score,
            "entries": [{"block": i, "component": c, **v} for (i, c), v in entries],
            "similarity": [{"block": i, "cosine": s} for i, s in sorted(self.similarity.items())],
            "timesteps": self.timesteps,
            "transformer_config": self.transformer_config,
            "run": self.run,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the analysis") -> ContributionReport:
        if not isinstance(data, Mapping) or data.get("format") != ANALYSIS_FORMAT:
            raise AnalysisError(
                f"{source} is not a diffusers-hprune analysis file (no \"format\": {ANALYSIS_FORMAT!r}); "
                "make one with `hprune analyze MODEL --out analysis.json`."
            )
        if data.get("format_version") != ANALYSIS_FORMAT_VERSION:
            raise AnalysisError(
                f"{source} has format version {data.get('format_version')!r}; this diffusers-hprune reads version "
                f"{ANALYSIS_FORMAT_VERSION}. Upgrade diffusers-hprune or analyse the model again."
            )
        try:
            report = cls(
                family=str(data["family"]),
                num_blocks=int(data["num_blocks"]),
                model=str(data["model"]),
                fingerprint=str(data["fingerprint"]),
                transformer_config=dict(data["transformer_config"]),
                metric=dict(data["metric"]),
                calibration=dict(data["calibration"]),
                pairs=bool(data.get("pairs", False)),
                baseline_score=None if data.get("baseline_score") is None else float(data["baseline_score"]),
                entries={_key(e): {"score": float(e["score"]), "delta": float(e["delta"])} for e in data["entries"]},
                similarity={int(s["block"]): float(s["cosine"]) for s in data.get("similarity", [])},
                timesteps=[float(t) for t in data.get("timesteps", [])],
                run=dict(data.get("run", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AnalysisError(f"{source} is corrupt ({type(e).__name__}: {e}); analyse the model again.") from None
        family = report.model_family
        if family.name != report.family or family.num_blocks(report.transformer_config) != report.num_blocks:
            raise AnalysisError(f"{source} is inconsistent: its family or block count does not match its config.")
        for (i, c), v in report.entries.items():
            if not all(math.isfinite(x) for x in v.values()):
                raise AnalysisError(f"{source} has a non-finite value for block {i}, {c}; analyse the model again.")
        return report

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report atomically as JSON."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContributionReport:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AnalysisError(f"No analysis at {path}; run `hprune analyze MODEL --out {path}` first.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{path} is not valid JSON ({e}); the file is corrupt, analyse the model again.") from None
        return cls.from_dict(data, source=str(path))

    def check_model(self, config_or_transformer: Any) -> None:
        """Raise :class:`AnalysisError` unless this analysis was made for a model with this architecture."""
        family = get_family(config_or_transformer)
        config = dict(getattr(config_or_transformer, "config", config_or_transformer))
        if family.name != self.family:
            raise AnalysisError(
                f"This analysis was made for a {self.family} model ({self.model}) but the model is a "
                f"{family.display_name} ({family.name}); analyse this model with `hprune analyze`."
            )
        if architecture_hash(config) != architecture_hash(self.transformer_config):
            raise AnalysisError(
                f"This analysis was made for another {family.display_name} architecture ({self.model}: "
                f"{self.num_blocks} blocks); analyse this model with `hprune analyze`."
            )


def architecture_hash(config: Mapping[str, Any]) -> str:
    """Hash of the config entries that define the architecture (not names, versions or plans)."""
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "prune_plan"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(transformer: torch.nn.Module) -> str:
    """Architecture plus a weight digest (per-parameter sums in float64): two models share entries only if equal."""
    h = hashlib.sha256(architecture_hash(transformer.config).encode())
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            d = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{float(d.sum()):.6e}:{float(d.abs().sum()):.6e}".encode())
    return h.hexdigest()[:24]


# -- calibration ------------------------------------------------------------------------------
def _is_toy(pipe) -> str | None:
    from . import toy

    source = str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", ""))
    for fam in toy.FAMILIES:
        try:
            if source and Path(source).resolve() == toy.model_path(fam).resolve():
                return fam
        except FileNotFoundError:
            continue
    return None


def generation_settings(pipe, num_inference_steps=None, height=None, width=None, guidance_scale=None) -> dict:
    """Pipeline call arguments for the calibration images: the toy's own for the toys, else the pipeline's defaults."""
    from . import toy

    fam = _is_toy(pipe)
    kwargs = toy.generation_kwargs(fam) if fam else {}
    for name, value in (("num_inference_steps", num_inference_steps), ("height", height), ("width", width)):
        if value is not None:
            kwargs[name] = int(value)
    if guidance_scale is not None:
        kwargs["true_cfg_scale" if "true_cfg_scale" in kwargs else "guidance_scale"] = float(guidance_scale)
    kwargs.setdefault("num_inference_steps", 28)
    return kwargs


def eval_step_indices(num_steps: int, eval_steps: int) -> list[int]:
    """``eval_steps`` denoising steps spread evenly over ``num_steps`` (first and last included)."""
    if eval_steps < 1:
        raise AnalysisError(f"--eval-steps must be at least 1, got {eval_steps}.")
    if eval_steps >= num_steps:
        return list(range(num_steps))
    return sorted({round(k * (num_steps - 1) / (eval_steps - 1)) for k in range(eval_steps)}) if eval_steps > 1 else [0]


@contextlib.contextmanager
def swapped_transformer(pipe, transformer):
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        yield pipe
    finally:
        pipe.transformer = original


def _generate(pipe, prompts, seeds, kwargs, batch_size, on_step=None):
    images = []
    device = pipe._execution_device
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[start : start + batch_size]]
        extra = {}
        if on_step is not None:
            on_step(0)

            def callback(p, i, t, cb_kwargs):
                on_step(i + 1)
                return {}

            extra["callback_on_step_end"] = callback
        images += pipe(chunk, generator=generators, **kwargs, **extra).images
    return images


# -- the runner --------------------------------------------------------------------------------
def _load_pipeline(model, device, torch_dtype):
    from diffusers import DiffusionPipeline

    from . import toy

    if not isinstance(model, (str, os.PathLike)):
        return model, str(getattr(model, "name_or_path", type(model).__name__))
    name = str(model)
    path = toy.model_path(name.removeprefix("toy-")) if name.removeprefix("toy-") in toy.FAMILIES else name
    try:
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise AnalysisError(
            f"Could not load the pipeline {name!r} ({type(e).__name__}: {e}). Pass a pipeline folder, a Hub repo id "
            "available in the local cache, or a toy name (sd3, flux)."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), name


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _read_known(report: ContributionReport, out: Path | None, overwrite: bool, is_main: bool) -> None:
    """Merge entries from ``out`` and its parts folder into ``report`` (resume); refuse mismatched files."""
    if out is None:
        return
    sources = ([out] if out.exists() else []) + sorted(_parts_dir(out).glob("rank-*.json"))
    for path in sources:
        if overwrite:
            continue
        try:
            other = ContributionReport.load(path)
        except AnalysisError as e:
            raise AnalysisError(f"{e} (Found while resuming; pass --overwrite to start again, replacing it.)") from None
        if other.settings() != report.settings():
            differs = [k for k, v in report.settings().items() if other.settings().get(k) != v]
            raise AnalysisError(
                f"{path} holds an analysis with other settings ({', '.join(differs)} differ: another model, metric or "
                "calibration); pass --overwrite to replace it, or choose another --out."
            )
        report.entries.update(other.entries)
        report.similarity.update(other.similarity)
        report.timesteps = report.timesteps or other.timesteps
        if other.baseline_score is not None:
            report.baseline_score = other.baseline_score


def analyze(
    model,
    out: str | os.PathLike | None = None,
    *,
    metric: str = "fidelity",
    metric_options: Mapping[str, Any] | None = None,
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
    torch_dtype: torch.dtype | None = None,
    cache_device: str | torch.device | None = None,
    progress: bool = True,
) -> ContributionReport:
    """Measure dP for every block and component of an SD3/FLUX pipeline's transformer.

    Args:
        model: a pipeline, a pipeline folder or Hub repo id, or a toy name (``sd3``, ``flux``).
        out: the ``analysis.json`` to write; also where a stopped run resumes from.
        metric: a name from :mod:`diffusers_hprune.metrics` (``fidelity``, ``shapeeval``, ``clip_score``, ``hpsv2``).
        metric_options: options of the metric (e.g. ``{"model": "path/to/clip"}`` for clip_score).
        prompts: calibration prompts; default: ``n_prompts`` of the toy's training prompts for the
            toys, else of a built-in varied list.
        seed: image ``k`` is drawn with seed ``seed + k``.
        num_inference_steps, height, width, guidance_scale: calibration generation (default:
            the toy's settings, or the pipeline's defaults with 28 steps).
        eval_steps: denoising steps at which the fidelity metric compares predictions.
        pairs: also measure every pair of components of a block removed together.
        method: ``cached`` (default); ``naive`` rebuilds and runs the whole ablated model per
            entry (full model's outputs computed once); ``scratch`` also recomputes the full
            model's outputs for every entry. The latter two are for verification and benchmarks
            and give the same numbers.
        overwrite: start again, replacing an existing ``out`` of other settings.
        torch_dtype: weights and activations (default float32 on CPU, bfloat16 on GPU).
        cache_device: where the cached block outputs live (default: with the model; ``"cpu"``
            keeps them in host memory, for large models at high resolution).
    """
    from tqdm.auto import tqdm

    from .ablation import (
        BlockCache,
        BlockCounter,
        entry_plan,
        naive_outputs,
        normalised_error,
        record_transformer_calls,
    )
    from .metrics import OUTPUT, get_metric

    if method not in METHODS:
        raise AnalysisError(f"Unknown analysis method {method!r}; choose one of {', '.join(METHODS)}.")
    state = process_state()
    if out is None and state.num_processes > 1:
        raise AnalysisError("A sharded analysis (several processes) needs an output file (--out) to merge into.")
    metric_def = get_metric(metric)
    scorer = metric_def.build(**dict(metric_options or {}))
    if torch_dtype is None:
        torch_dtype = torch.float32 if state.device.type == "cpu" else torch.bfloat16
    pipe, model_name = _load_pipeline(model, state.device, torch_dtype)
    transformer = pipe.transformer
    family = get_family(transformer)
    plan = getattr(transformer, "prune_plan", None)
    if plan is not None and not plan.is_empty:
        raise AnalysisError(
            f"{model_name} is already pruned ({plan.describe()}); analyse the original model, whose contributions the "
            "planner needs."
        )
    fam = _is_toy(pipe)
    if prompts is None:
        from . import toy

        if n_prompts < 1:
            raise AnalysisError(f"--n-prompts must be at least 1, got {n_prompts}.")
        prompts = toy.prompts(split="train", n=n_prompts, seed=seed) if fam else list(
            itertools.islice(itertools.cycle(DEFAULT_PROMPTS), n_prompts))
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise AnalysisError("The calibration prompt list is empty; give at least one prompt.")
    seeds = [seed + k for k in range(len(prompts))]
    gen_kwargs = generation_settings(pipe, num_inference_steps, height, width, guidance_scale)
    steps = eval_step_indices(gen_kwargs["num_inference_steps"], eval_steps)
    config = {k: v for k, v in dict(transformer.config).items() if k != "prune_plan"}
    config["_class_name"] = family.base_class_name  # absent from models built in code
    report = ContributionReport(
        family=family.name,
        num_blocks=family.num_blocks(config),
        model=model_name,
        fingerprint=fingerprint(transformer),
        transformer_config=json.loads(json.dumps(config, default=str)),
        metric={"name": metric, "options": dict(metric_options or {})},
        calibration={"prompts": prompts, "seeds": seeds, "generation": gen_kwargs, "eval_steps": steps,
                     "batch_size": batch_size, "dtype": str(torch_dtype).removeprefix("torch.")},
        pairs=pairs,
    )
    out = Path(out) if out is not None else None
    _read_known(report, out, overwrite, state.is_main_process)
    state.wait_for_everyone()
    if out is not None and overwrite and state.is_main_process:
        shutil.rmtree(_parts_dir(out), ignore_errors=True)
    state.wait_for_everyone()
    reused = len(report.entries)
    todo = [k for k in report.expected_keys() if k not in report.entries]
    mine = todo[state.process_index :: state.num_processes]
    part = _parts_dir(out) / f"rank-{state.process_index}.json" if out is not None else None
    counter = BlockCounter()
    started = time.perf_counter()
    need_similarity = len(report.similarity) < report.num_blocks
    cache_bytes = 0

    if mine or report.baseline_score is None or need_similarity:
        # The full model draws the calibration images; its transformer inputs are recorded.
        step = [0]
        with torch.no_grad(), record_transformer_calls(transformer) as calls:
            call_steps = []

            def on_step(i):
                step[0] = i

            def tag(module, args, kwargs):
                call_steps.append(step[0])

            handle = transformer.register_forward_pre_hook(tag, with_kwargs=True)
            try:
                images = _generate(pipe, prompts, seeds, gen_kwargs, batch_size, on_step)
            finally:
                handle.remove()
        selected = [c for c, s in zip(calls, call_steps) if s in steps]
        report.timesteps = sorted({float(c.kwargs["timestep"].flatten()[0]) for c in selected}, reverse=True)
        cache = BlockCache.build(transformer, selected, cache_device=cache_device, counter=counter)
        cache_bytes = cache.nbytes
        report.similarity.update(cache.similarity)
        if metric_def.kind == OUTPUT:
            references = [c.output for c in selected]
            if report.baseline_score is None:
                # Removing nothing: through the cache (no block runs) or through the whole model.
                base = (cache.ablated_outputs(family.empty_plan(config), counter) if method == "cached"
                        else naive_outputs(transformer, family.empty_plan(config), selected, counter))
                report.baseline_score = 0.0 - normalised_error(base, references)
        else:
            del cache
            if report.baseline_score is None:
                report.baseline_score = float(scorer(images, prompts))

        def measure(key) -> float:
            i, c = key
            entry = entry_plan(family, config, i, tuple(c.split("+")))
            if metric_def.kind == OUTPUT:
                if method == "cached":
                    return 0.0 - normalised_error(cache.ablated_outputs(entry, counter), references)
                outputs = naive_outputs(transformer, entry, selected, counter)
                if method == "scratch":  # P(original) and P(ablated) each computed from scratch
                    refs = naive_outputs(transformer, family.empty_plan(config), selected, counter)
                    return 0.0 - normalised_error(outputs, refs)
                return 0.0 - normalised_error(outputs, references)
            from .prune import prune_transformer

            with swapped_transformer(pipe, prune_transformer(transformer, entry)):
                return float(scorer(_generate(pipe, prompts, seeds, gen_kwargs, batch_size), prompts))

        bar = tqdm(mine, desc=f"analysis ({metric})", unit="entry", disable=not (progress and state.is_main_process))
        for key in bar:
            score = measure(key)
            report.entries[key] = {"score": score, "delta": report.baseline_score - score}
            bar.set_postfix_str(f"block {key[0]} {key[1]}")
            if part is not None:
                report.run = {"block_evaluations": counter.count, "seconds": time.perf_counter() - started}
                report.save(part)

    seconds = time.perf_counter() - started
    report.run = {"method": method, "processes": state.num_processes, "reused_entries": reused,
                  "cache_bytes": cache_bytes,
                  "computed_entries": len(mine), "block_evaluations": counter.count, "seconds": round(seconds, 3)}
    if out is None:
        return report
    report.save(part)
    state.wait_for_everyone()
    if state.is_main_process:
        merged = _merge(report, out)
        merged.save(out)
        if merged.complete:
            shutil.rmtree(_parts_dir(out), ignore_errors=True)
    state.wait_for_everyone()
    final = ContributionReport.load(out)
    final.run["this_process"] = report.run
    return final


def _merge(report: ContributionReport, out: Path) -> ContributionReport:
    """The main process's report plus every rank's part file; the run costs of this run's ranks are summed."""
    merged = ContributionReport(**{k: getattr(report, k) for k in (
        "family", "num_blocks", "model", "fingerprint", "transformer_config", "metric", "calibration", "pairs")})
    merged.baseline_score = report.baseline_score
    merged.entries = dict(report.entries)
    merged.similarity = dict(report.similarity)
    merged.timesteps = report.timesteps
    totals = {"block_evaluations": 0, "seconds": 0.0}
    processes = int(report.run.get("processes", 1))
    for path in sorted(_parts_dir(out).glob("rank-*.json")):
        other = ContributionReport.load(path)
        merged.entries.update(other.entries)
        merged.similarity.update(other.similarity)
        if int(path.stem.split("-")[1]) < processes:
            for k in totals:
                totals[k] += other.run.get(k, 0)
    merged.run = {"method": report.run.get("method"), "processes": processes, **totals}
    return merged


# Relative weight of each component's dP in a synthetic analysis (modulations and attention
# matter most, the text-stream MLP least), loosely following the paper's Fig. 8.
_SYNTHETIC_COMPONENT_WEIGHT = {"norm1": 0.8, "norm": 0.8, "attn": 0.6, "ff": 0.35, "mlp": 0.35,
                               "norm1_context": 0.25, "ff_context": 0.15}


def synthetic_report(source, seed: int = 0, pairs: bool = False) -> ContributionReport:
    """A made-up analysis shaped like the paper's (later blocks matter less), from a config alone.

    For planning and memory estimates of models whose weights are not here (SD3.5 Large
    Turbo, FLUX.1-schnell): ``dP(i, block) = 0.02 + exp(-4 i / (|B| - 1))`` with +-25 %
    seeded noise; a component's dP is its block's times a fixed weight per kind, with noise.
    Marked ``"metric": {"name": "synthetic"}`` so it is never mistaken for a measurement.
    """
    import random

    from .inventory import load_transformer_config

    config = {k: v for k, v in load_transformer_config(source).items() if k != "prune_plan"}
    family = get_family(config)
    specs = family.block_specs(config)
    n = len(specs)
    rng = random.Random(seed)
    report = ContributionReport(
        family=family.name,
        num_blocks=n,
        model=str(config.get("_name_or_path") or source),
        fingerprint="synthetic-" + architecture_hash(config),
        transformer_config=json.loads(json.dumps(config, default=str)),
        metric={"name": "synthetic", "options": {"seed": seed}},
        calibration={"synthetic": "dP(i, block) = 0.02 + exp(-4 i / (|B| - 1)), +-25 % noise; components: fixed share"},
        pairs=pairs,
        baseline_score=1.0,
    )
    for spec in specs:
        depth = spec.index / max(1, n - 1)
        block = 0.02 + math.exp(-4 * depth) * (1 + 0.25 * rng.uniform(-1, 1))
        values = {BLOCK: block}
        for c in spec.components:
            values[c] = block * _SYNTHETIC_COMPONENT_WEIGHT.get(c, 0.5) * (1 + 0.25 * rng.uniform(-1, 1))
        if pairs:
            for a, b in itertools.combinations(spec.components, 2):
                values[f"{a}+{b}"] = min(block, values[a] + values[b])
        for c, d in values.items():
            report.entries[(spec.index, c)] = {"score": 1.0 - d, "delta": d}
        report.similarity[spec.index] = 1.0 - 0.1 * block
    return report
