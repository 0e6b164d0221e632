"""Quality metrics P (higher is better), chosen by name; a small registry users can add to.

Three kinds:

* ``output`` metrics compare the ablated transformer's prediction with the full model's at
  the inputs recorded while the full model drew the calibration images. ``velocity`` is the
  one built in: ``P = -sum ||v - v_full||^2 / sum ||v_full||^2`` (negative normalised MSE of
  the predicted velocity at a few denoising steps), so the full model scores 0 and ``dP`` is
  the normalised error a removal causes. Fast (no decoding, cached analysis), but a proxy:
  the last blocks write the output directly and look indispensable by it. (It was called
  ``fidelity`` before; that name still works and warns.)
* ``reference`` metrics compare the final images of the ablated model's whole denoising
  trajectory (same noise, prompts and settings) with the full model's final images:
  ``image_fidelity``, ``P = -MSE`` of the decoded pixels in [0, 1] pooled over the images (the
  full model scores 0; ``dP`` is the MSE, ``PSNR = -10 log10(dP)``), or ``measure=ssim``
  (torchmetrics' SSIM, ``dP = 1 - SSIM``). Scorers are called as ``score(images, references)``.
* ``image`` metrics score the images a pipeline draws for the calibration prompts and seeds:
  ``shapeeval`` (the toy models' prompt adherence), ``clip_score`` (torchmetrics' CLIPScore
  with a CLIP model available locally) and ``hpsv2`` (the hpsv2 package and its weights).
  ``shapeeval`` and ``clip_score`` are text-image *alignment* scores: what the ``bk-sdm``
  strategy ranks blocks by.

:data:`DEFAULT_METRIC` is the one ``hprune analyze`` uses unless told otherwise, chosen by the
measurement in BENCHMARKS.md ("metric-correlation"; docs/removal.md says why).

Add one with :func:`register_metric`::

    from diffusers_hprune.metrics import register_metric

    @register_metric("mean_brightness", description="mean pixel value")
    def mean_brightness(images, prompts):
        import numpy as np
        return float(np.mean([np.asarray(im, dtype=float).mean() / 255 for im in images]))

Image scorers are called as ``score(images, prompts) -> float`` with PIL images; a factory
registered with ``factory=True`` is called once with the metric options (``--metric-arg
key=value`` on the command line) and returns such a scorer.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusers_hprune.toy import shapeeval
from diffusers_hprune.utils.errors import HPruneError

OUTPUT, REFERENCE, IMAGE = "output", "reference", "image"

#: Former names of built-in metrics: still accepted (with a warning), and read from older analysis files.
RENAMED = {"fidelity": "velocity"}


class MetricError(HPruneError):
    """Unknown metric, or a metric whose model or package is not available."""


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    description: str
    scorer: Callable[..., Any] | None = None
    factory: bool = False
    alignment: bool = False
    """A text-image alignment score of the final images (what ``bk-sdm`` ranks by)."""

    def build(self, **options) -> Callable[[list, list[str]], float] | None:
        """The ready scorer (``None`` for output metrics)."""
        if self.kind == OUTPUT:
            if options:
                raise MetricError(f"The {self.name} metric takes no options (got {', '.join(options)}).")
            return None
        if self.factory:
            return self.scorer(**options)
        if options:
            raise MetricError(f"The {self.name} metric takes no options (got {', '.join(options)}).")
        return self.scorer


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, *, description: str = "", kind: str = IMAGE, factory: bool = False,
                    alignment: bool = False):
    """Decorator registering a scorer as ``name``: ``fn(images, prompts) -> float`` (kind ``image``) or
    ``fn(images, references) -> float`` (kind ``reference``), or with ``factory=True`` a factory of one.
    ``alignment=True`` marks a text-image alignment score. A name already registered is refused."""
    if kind not in (REFERENCE, IMAGE):
        raise ValueError(f"kind must be {REFERENCE!r} or {IMAGE!r} (output metrics are built in)")
    if name in _REGISTRY or name in RENAMED:
        raise MetricError(f"A metric named {name!r} is registered already; give the new one another name.")

    def decorate(fn):
        _REGISTRY[name] = Metric(name, kind, description or (fn.__doc__ or "").strip().split("\n")[0], fn, factory,
                                 alignment)
        return fn

    return decorate


def metric_names() -> list[str]:
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """``name``, or the current name of a renamed built-in metric."""
    return RENAMED.get(name, name)


def get_metric(name: str) -> Metric:
    if name in RENAMED:
        warnings.warn(f"The {name!r} metric is now called {RENAMED[name]!r}; {name!r} will stop working in a later "
                      "release.", FutureWarning, stacklevel=2)
        name = RENAMED[name]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MetricError(
            f"Unknown metric {name!r}; available: {', '.join(metric_names())}. "
            "Register your own with diffusers_hprune.metrics.register_metric."
        ) from None


_REGISTRY["velocity"] = Metric(
    "velocity", OUTPUT, "negative normalised MSE of the predicted velocity vs the full model's, at a few steps (fast "
    "proxy, no decoding)"
)


#: The metric of ``hprune analyze`` / ``compress`` when none is given (BENCHMARKS.md, "metric-correlation").
DEFAULT_METRIC = "image_fidelity"
#: The alignment score ``bk-sdm`` ranks by: CLIP score on real models, ShapeEval on the toys (no CLIP weights there).
ALIGNMENT_METRICS = {"toy": "shapeeval", "model": "clip_score"}


TORCHMETRICS = "1.7"
"""The oldest torchmetrics the optional metrics work with (CLIPScore takes a model loader from 1.7)."""


def _require_torchmetrics(what: str, alternative: str = "") -> None:
    """Raise :class:`MetricError` unless torchmetrics >= :data:`TORCHMETRICS` is installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        found = version("torchmetrics")
    except PackageNotFoundError:
        found = None
    if found is None or Version(found) < Version(TORCHMETRICS):
        has = f"torchmetrics {found} is installed" if found else "torchmetrics is not installed"
        raise MetricError(f"{what} needs torchmetrics>={TORCHMETRICS} ({has}): pip install "
                          f"'diffusers-hprune[metrics]'{' ' + alternative if alternative else ''}.")


def _pixels(images):
    import numpy as np

    return [np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images]


@register_metric("image_fidelity", kind=REFERENCE, factory=True,
                 description="the final images vs the full model's from the same noise: -MSE of the pixels "
                 "(option measure=ssim: SSIM, needs torchmetrics)")
def _image_fidelity(measure: str = "mse"):
    if measure not in ("mse", "ssim"):
        raise MetricError(f"image_fidelity measures 'mse' or 'ssim', not {measure!r} (--metric-arg measure=mse).")
    if measure == "ssim":
        _require_torchmetrics("image_fidelity with measure=ssim", "(or use measure=mse)")

    def mse(images, references) -> float:
        import numpy as np

        if len(images) != len(references) or not images:
            raise MetricError(f"image_fidelity compares as many images as references (got {len(images)} and "
                              f"{len(references)}).")
        a, b = _pixels(images), _pixels(references)
        return 0.0 - float(np.mean([np.mean((x - y) ** 2) for x, y in zip(a, b)]))

    def ssim(images, references) -> float:
        import numpy as np
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure

        a, b = (torch.from_numpy(np.stack(_pixels(x))).permute(0, 3, 1, 2) for x in (images, references))
        kernel = min(11, a.shape[-1] - (1 - a.shape[-1] % 2), a.shape[-2] - (1 - a.shape[-2] % 2))
        return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel))

    return mse if measure == "mse" else ssim


@register_metric("shapeeval", alignment=True,
                 description="ShapeEval prompt adherence of the toy shapes models (overall score)")
def _shapeeval(images, prompts) -> float:
    return float(shapeeval(images, prompts)["overall"])


@register_metric("clip_score", factory=True, alignment=True,
                 description="torchmetrics CLIPScore with a locally available CLIP model (option model=PATH_OR_ID)")
def _clip_score(model: str = "openai/clip-vit-base-patch16"):
    _require_torchmetrics("The clip_score metric")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    try:
        # Any local folder or cached repo id (torchmetrics itself only names a few openai repos).
        loaded = (_CLIPFeatures(CLIPModel.from_pretrained(model)), CLIPProcessor.from_pretrained(model))
        metric = CLIPScore(model_name_or_path=lambda: loaded)
    except Exception as e:  # transformers raises OSError / ValueError flavours for missing files
        raise MetricError(
            f"Could not load the CLIP model {model!r} for clip_score ({type(e).__name__}: {e}). Download it first "
            "(huggingface-cli download ...) or pass a local folder with --metric-arg model=PATH."
        ) from None

    def score(images, prompts) -> float:
        import numpy as np
        import torch

        batch = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        metric.reset()
        metric.update(batch, list(prompts))
        return float(metric.compute())

    return score


def _features(out):
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clip_features_class():
    import torch

    class CLIPFeatures(torch.nn.Module):
        """A CLIPModel whose feature methods return tensors (transformers 5 returns model outputs, which
        torchmetrics' CLIPScore does not expect)."""

        def __init__(self, clip):
            super().__init__()
            self.clip = clip
            self.config = clip.config

        def get_image_features(self, *args, **kwargs):
            return _features(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _features(self.clip.get_text_features(*args, **kwargs))

    return CLIPFeatures


def _CLIPFeatures(clip):
    return _clip_features_class()(clip)


@register_metric("hpsv2", factory=True, description="Human Preference Score v2 (needs the hpsv2 package and its weights)")
def _hpsv2(version: str = "v2.1"):
    if importlib.util.find_spec("hpsv2") is None:
        raise MetricError(
            "The hpsv2 metric needs the hpsv2 package and its checkpoint: pip install hpsv2, then make the "
            "HPS checkpoint available locally (see the hpsv2 README)."
        )
    import hpsv2

    def score(images, prompts) -> float:
        values = [float(hpsv2.score(im, p, hps_version=version)[0]) for im, p in zip(images, prompts)]
        return sum(values) / len(values)

    return score
