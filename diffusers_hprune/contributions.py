"""The contribution report (``analysis.json``): what the analysis measured, read by planning and distillation.

A :class:`ContributionReport` holds dP(i, c) for every block i and component c of one
transformer, the settings it was measured with and the fingerprint of the weights it was
measured on (docs/formats.md). It is the object that travels from ``hprune analyze`` to
``hprune plan`` and to SGDistill, so it lives below all three stages.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusers_hprune.architecture import BLOCK, ModelFamily, get_family
from diffusers_hprune.plan import MAX_BLOCKS
from diffusers_hprune.utils.checks import InputError, check_number, read_text_file
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json
from diffusers_hprune.utils.float64 import float64

ANALYSIS_FORMAT = "diffusers-hprune/analysis"
ANALYSIS_FORMAT_VERSION = 1


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

    ``entries`` maps ``(block index, component)`` to ``{"score": P(ablated), "delta": dP}``; an
    entry of an adaptive analysis (``analyze(..., stopping=...)``, ``hprune analyze --images auto``)
    measured on fewer than all calibration images also holds ``n_images``, ``interval`` (``[low,
    high]`` around dP) and ``values`` (dP of each image, in the order measured): see :meth:`images_of`;
    ``similarity`` maps a block index to the cosine similarity of its input and output in
    the full model (what the ``koala`` strategy ranks by). ``alignment`` (optional) holds
    the whole-block dP of a text-image alignment score (``--alignment-metric``: what the
    ``bk-sdm`` strategy ranks by) as ``{"metric": {...}, "baseline_score": P, "blocks": {i: {...}}}``.
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
    entries: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    alignment: dict[str, Any] = field(default_factory=dict)
    components: str | None = None  # components_fingerprint of the pipeline (None: a synthetic analysis)

    # -- queries -------------------------------------------------------------------
    @property
    def model_family(self) -> ModelFamily:
        return get_family(self.transformer_config)

    def expected_keys(self) -> list[tuple[int, str]]:
        return component_keys(self.model_family, self.transformer_config, self.pairs)

    @property
    def complete(self) -> bool:
        return self.baseline_score is not None and all(k in self.entries for k in self.expected_keys())

    @property
    def calibration_images(self) -> int:
        """How many calibration images (prompts with their seeds) the analysis draws."""
        return len(self.calibration.get("prompts", ()))

    def entry_images(self, key: tuple[int, str]) -> int:
        """How many calibration images entry ``key`` is measured on in full: all for whole blocks, the first
        ``calibration["component_images"]`` (where set: the paper measures components on 80 images of its 400) for
        components and pairs."""
        return self.calibration_images if key[1] == BLOCK else self.component_images

    @property
    def component_images(self) -> int:
        """How many of the calibration images (the first) component and pair entries are measured on."""
        return min(self.calibration_images, int(self.calibration.get("component_images", self.calibration_images)))

    def images_of(self, key: tuple[int, str]) -> int:
        """How many calibration images entry ``key``'s dP was measured on: :meth:`entry_images`, unless an adaptive
        analysis stopped it early (``n_images``)."""
        return int(self.entries[key].get("n_images", self.entry_images(key)))

    def stopped_early(self, key: tuple[int, str]) -> bool:
        """Whether an adaptive analysis stopped entry ``key`` before its images (its dP an estimate)."""
        return self.images_of(key) < self.entry_images(key)

    def contributions(self, pairs: bool = False) -> dict[tuple[int, str], float]:
        """``(block, component) -> dP``; pair entries (``"a+b"``) only with ``pairs=True``."""
        return {k: v["delta"] for k, v in self.entries.items() if pairs or "+" not in k[1]}

    def alignment_contributions(self) -> dict[int, float] | None:
        """``block -> dP`` of a text-image alignment score (the ``alignment`` part), or ``None`` when
        the analysis measured none. An analysis whose main metric is an alignment score
        (``--metric shapeeval`` / ``clip_score``) has its whole-block entries there too."""
        blocks = self.alignment.get("blocks") if self.alignment else None
        if not blocks:
            return None
        return {int(i): float(v["delta"]) for i, v in blocks.items()}

    def settings(self) -> dict[str, Any]:
        """What must match for two runs to share entries (model, metric, calibration, pairs)."""
        return {
            "family": self.family,
            "num_blocks": self.num_blocks,
            "fingerprint": self.fingerprint,
            "components": self.components,
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
            "components": self.components,
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
            **({"alignment": {
                "metric": self.alignment.get("metric"), "baseline_score": self.alignment.get("baseline_score"),
                "entries": [{"block": i, **v} for i, v in sorted(self.alignment.get("blocks", {}).items())],
            }} if self.alignment else {}),
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
            _check_shape(data, source)
        except AnalysisError as e:
            raise AnalysisError(f"{e} The file was edited or is corrupt; analyse the model again.") from None
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
                entries={_key(e): _entry(e) for e in data["entries"]},
                similarity={int(s["block"]): float(s["cosine"]) for s in data.get("similarity", [])},
                timesteps=[float(t) for t in data.get("timesteps", [])],
                run=dict(data.get("run", {})),
                alignment=_alignment(data.get("alignment")),
                components=None if data.get("components") is None else str(data["components"]),
            )
            family = report.model_family
            num_blocks = family.num_blocks(report.transformer_config)
            expected = report.expected_keys()
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, HPruneError):
                raise AnalysisError(f"{source}: {e}") from None
            raise AnalysisError(f"{source} is corrupt ({type(e).__name__}: {e}); analyse the model again.") from None
        if family.name != report.family or num_blocks != report.num_blocks:
            raise AnalysisError(f"{source} is inconsistent: its family or block count does not match its config; "
                                "analyse the model again.")
        unknown = sorted(set(report.entries) - set(expected))
        if unknown:
            raise AnalysisError(
                f"{source} has {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} for parts the {family.name} "
                f"model it describes ({report.num_blocks} blocks, indices 0..{report.num_blocks - 1}) does not have: "
                f"{describe_keys(unknown)}. The file was edited or is corrupt; analyse the model again."
            )
        return report

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report atomically as JSON."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ContributionReport:
        path = Path(path)
        if not path.exists():
            raise AnalysisError(f"No analysis at {path}; run `hprune analyze MODEL --out {path}` first.")
        try:
            text = read_text_file(path, "analysis")
        except InputError as e:
            raise AnalysisError(str(e)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{path} is not valid JSON ({e}); the file is corrupt, analyse the model again.") from None
        return cls.from_dict(data, source=str(path))

    def missing_keys(self) -> list[tuple[int, str]]:
        """The expected entries the analysis does not have yet."""
        return [k for k in self.expected_keys() if k not in self.entries]

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


def _alignment(data) -> dict[str, Any]:
    if not data:
        return {}
    return {"metric": dict(data["metric"]),
            "baseline_score": None if data.get("baseline_score") is None else float(data["baseline_score"]),
            "blocks": {int(e["block"]): {"score": float(e["score"]), "delta": float(e["delta"])}
                       for e in data.get("entries", [])}}


def _entry(e: Mapping[str, Any]) -> dict[str, Any]:
    """An entry as the report holds it: score and delta, and an adaptive analysis's images, interval and values."""
    entry: dict[str, Any] = {"score": float(e["score"]), "delta": float(e["delta"])}
    if "n_images" in e:
        entry["n_images"] = int(e["n_images"])
    if "interval" in e:
        entry["interval"] = [float(v) for v in e["interval"]]
    if "values" in e:
        entry["values"] = [float(v) for v in e["values"]]
    return entry


def describe_keys(keys: list[tuple[int, str]], limit: int = 5) -> str:
    """``block 3 ff, block 4 block, ... (12 in all)``: entries named for a message."""
    shown = ", ".join(f"block {i} {c}" for i, c in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_shape(data: Mapping[str, Any], source: str) -> None:
    """The JSON types of an analysis file, and its block counts bounded, before anything is built from it.

    A count of blocks drives loops and lists per block (the expected entries, the planner's
    inventory): ``num_layers: 1e9`` must be refused here, not discovered as memory exhausted.
    """
    def check(name, value, **bounds):
        check_number(f"{source}: {name}", value, error=AnalysisError, **bounds)

    for name, kind in (("transformer_config", Mapping), ("metric", Mapping), ("calibration", Mapping),
                       ("entries", list), ("similarity", list), ("timesteps", list), ("run", Mapping),
                       ("alignment", Mapping)):
        if name in data and not isinstance(data[name], kind):
            raise AnalysisError(f"{source}: `{name}` must be {'an object' if kind is Mapping else 'a list'}, got "
                                f"{type(data[name]).__name__}.")
    if "num_blocks" in data:
        check("num_blocks", data["num_blocks"], kind=int, minimum=1, maximum=MAX_BLOCKS)
    config = data.get("transformer_config", {})
    counts = {k: v for k, v in config.items() if str(k).startswith("num_") and str(k).endswith("layers")}
    for name, value in counts.items():
        check(f"transformer_config.{name}", value, kind=int, minimum=0, maximum=MAX_BLOCKS)
    if sum(counts.values()) > MAX_BLOCKS:
        raise AnalysisError(f"{source}: its transformer_config claims {sum(counts.values()):,} blocks, more than the "
                            f"{MAX_BLOCKS:,} diffusers-hprune accepts.")
    if not isinstance(data.get("pairs", False), bool):
        raise AnalysisError(f"{source}: `pairs` must be true or false, got {data['pairs']!r}.")
    if data.get("baseline_score") is not None:
        check("baseline_score", data["baseline_score"])
    calibration = data.get("calibration") or {}
    images = len(calibration.get("prompts", ()))
    if calibration.get("component_images") is not None:
        check("calibration.component_images", calibration["component_images"], kind=int, minimum=1)
    component_images = min(images, calibration.get("component_images") or images)
    for n, entry in enumerate(data.get("entries", [])):
        if not isinstance(entry, Mapping):
            raise AnalysisError(f"{source}: entry {n} must be an object, got {type(entry).__name__}.")
        if "block" in entry:
            check(f"entry {n} block", entry["block"], kind=int, minimum=0)
        if not isinstance(entry.get("component"), str):
            raise AnalysisError(f"{source}: entry {n} needs a component name (a string), got "
                                f"{entry.get('component')!r}.")
        for name in ("score", "delta"):
            if name in entry:
                check(f"entry {n} (block {entry.get('block')}, {entry['component']}) {name}", entry[name])
        _check_adaptive(entry, f"entry {n} (block {entry.get('block')}, {entry['component']})", source,
                        images if entry["component"] == BLOCK else component_images, check)
    alignment = data.get("alignment") or {}
    if alignment:
        if not isinstance(alignment.get("metric"), Mapping) or not isinstance(alignment.get("entries", []), list):
            raise AnalysisError(f"{source}: `alignment` needs a `metric` object and an `entries` list.")
        if alignment.get("baseline_score") is not None:
            check("alignment baseline_score", alignment["baseline_score"])
        for n, entry in enumerate(alignment.get("entries", [])):
            if not isinstance(entry, Mapping) or not {"block", "score", "delta"} <= set(entry):
                raise AnalysisError(f"{source}: alignment entry {n} must be an object with block, score and delta.")
            check(f"alignment entry {n} block", entry["block"], kind=int, minimum=0,
                  maximum=max(int(data.get("num_blocks", MAX_BLOCKS)) - 1, 0))
            for name in ("score", "delta"):
                check(f"alignment entry {n} {name}", entry[name])
    for n, item in enumerate(data.get("similarity", [])):
        if not isinstance(item, Mapping):
            raise AnalysisError(f"{source}: similarity entry {n} must be an object, got {type(item).__name__}.")
        if "block" in item:
            check(f"similarity entry {n} block", item["block"], kind=int, minimum=0)
        if "cosine" in item:  # NaN would rank first for KOALA (it removed blocks 0-2 of an all-NaN analysis)
            check(f"similarity entry {n} cosine", item["cosine"], minimum=-1.001, maximum=1.001)


def _check_adaptive(entry: Mapping[str, Any], label: str, source: str, images: int, check) -> None:
    """An adaptive entry's ``n_images`` (1..the calibration images), ``interval`` (two numbers, low <= high) and
    ``values`` (one number per image measured)."""
    if "n_images" in entry:
        check(f"{label} n_images", entry["n_images"], kind=int, minimum=1, maximum=max(images, 1))
    if "interval" in entry:
        interval = entry["interval"]
        if not isinstance(interval, list) or len(interval) != 2:
            raise AnalysisError(f"{source}: {label} `interval` must be a list [low, high], got {interval!r}.")
        for bound in interval:
            check(f"{label} interval", bound)
        if interval[0] > interval[1]:
            raise AnalysisError(f"{source}: {label} has an interval whose low end {interval[0]} is above its high end "
                                f"{interval[1]}.")
    if entry.get("n_images", images) < images and "values" not in entry:
        raise AnalysisError(f"{source}: {label} was measured on {entry['n_images']} of the {images} calibration "
                            "images but has no `values` (each image's dP) to continue from.")
    if "values" in entry:
        values = entry["values"]
        if not isinstance(values, list) or len(values) != entry.get("n_images", -1):
            raise AnalysisError(f"{source}: {label} `values` must be a list of one number per image measured "
                                "(as many as n_images).")
        for v in values:
            check(f"{label} value", v)


def architecture_hash(config: Mapping[str, Any]) -> str:
    """Hash of the config entries that define the architecture (not names, versions, plans or quantisation)."""
    skip = ("prune_plan", "quantization_config")  # what a plan or a quantisation adds leaves the architecture
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in skip}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_digest(h, module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            d = float64(p)  # on the CPU where the device has no float64 (MPS)
            h.update(f"{name}:{tuple(p.shape)}:{float(d.sum()):.6e}:{float(d.abs().sum()):.6e}".encode())


def fingerprint(transformer: torch.nn.Module) -> str:
    """Architecture plus a weight digest (per-parameter sums in float64): two models share entries only if equal."""
    h = hashlib.sha256(architecture_hash(transformer.config).encode())
    _weights_digest(h, transformer)
    return h.hexdigest()[:24]


def components_fingerprint(pipe) -> str:
    """A digest of every component of the pipeline ``pipe`` but its transformer: what else changes what a stage
    measures or draws. Text encoders and the VAE by class, config and weights (per-parameter sums, as
    :func:`fingerprint`), tokenizers by class, vocabulary and length limit, the scheduler by its config."""
    h = hashlib.sha256()
    for name, component in sorted(getattr(pipe, "components", {}).items()):
        if name == "transformer" or component is None:
            continue
        h.update(f"{name}:{type(component).__name__};".encode())
        config = getattr(component, "config", None)
        if config is not None:
            fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            fields = {k: v for k, v in fields.items() if not str(k).startswith("_") and k not in (
                "transformers_version", "torch_dtype", "dtype", "name_or_path")}
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        if isinstance(component, torch.nn.Module):
            _weights_digest(h, component)
        elif hasattr(component, "get_vocab"):
            h.update(json.dumps(sorted(component.get_vocab().items()), default=str).encode())
            h.update(f"{getattr(component, 'model_max_length', None)}".encode())
    return h.hexdigest()[:24]


