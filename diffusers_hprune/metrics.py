"""Quality metrics P (higher is better), chosen by name; a small registry users can add to.

Two kinds:

* ``output`` metrics compare the ablated transformer's prediction with the full model's at
  the inputs recorded while the full model drew the calibration images. ``fidelity`` is
  the one built in: ``P = -sum ||v - v_full||^2 / sum ||v_full||^2`` (negative normalised
  MSE of the predicted velocity), so the full model scores 0 and ``dP`` is the normalised
  error a removal causes. It needs no extra model and allows the cached analysis.
* ``image`` metrics score the images a pipeline draws for the calibration prompts and seeds:
  ``shapeeval`` (the toy models' prompt adherence), ``clip_score`` (torchmetrics' CLIPScore
  with a CLIP model available locally) and ``hpsv2`` (the hpsv2 package and its weights).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusers_hprune.toy import shapeeval
from diffusers_hprune.utils.errors import HPruneError

OUTPUT, IMAGE = "output", "image"


class MetricError(HPruneError):
    """Unknown metric, or a metric whose model or package is not available."""


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    description: str
    scorer: Callable[..., Any] | None = None
    factory: bool = False

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


def register_metric(name: str, *, description: str = "", kind: str = IMAGE, factory: bool = False):
    """Decorator registering an image scorer ``fn(images, prompts) -> float`` (or a factory of one) as ``name``."""
    if kind not in (OUTPUT, IMAGE):
        raise ValueError(f"kind must be {OUTPUT!r} or {IMAGE!r}")

    def decorate(fn):
        _REGISTRY[name] = Metric(name, kind, description or (fn.__doc__ or "").strip().split("\n")[0], fn, factory)
        return fn

    return decorate


def metric_names() -> list[str]:
    return sorted(_REGISTRY)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MetricError(
            f"Unknown metric {name!r}; available: {', '.join(metric_names())}. "
            "Register your own with diffusers_hprune.metrics.register_metric."
        ) from None


_REGISTRY["fidelity"] = Metric(
    "fidelity", OUTPUT, "negative normalised MSE of the predicted velocity vs the full model (no extra model)"
)


@register_metric("shapeeval", description="ShapeEval prompt adherence of the toy shapes models (overall score)")
def _shapeeval(images, prompts) -> float:
    return float(shapeeval(images, prompts)["overall"])


@register_metric("clip_score", factory=True,
                 description="torchmetrics CLIPScore with a locally available CLIP model (option model=PATH_OR_ID)")
def _clip_score(model: str = "openai/clip-vit-base-patch16"):
    if importlib.util.find_spec("torchmetrics") is None:
        raise MetricError("The clip_score metric needs torchmetrics: pip install torchmetrics.")
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
