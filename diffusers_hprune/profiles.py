"""Per-model generation profiles: how each supported model is meant to be called.

SD3.5 Large Turbo and FLUX.1-schnell are 4-step models run without guidance; SD3.5 Large,
SD3.5 Medium, SD3 Medium and FLUX.1-dev take more steps and guidance. The paper analyses and
evaluates each model the way it is meant to run. The analysis, the distillation cache, the
validation images and the evaluation all draw with :func:`generation_kwargs`, and the
command-line flags override it.

A model is identified by its name (a Hub repo id, a folder of that name, a built-in config
name such as ``sd3.5-large-turbo``, or the ``_name_or_path`` its configs record). Without a
known name, its transformer config is compared with the shipped configs. That cannot tell
SD3.5 Large from SD3.5 Large Turbo (the same architecture), so the choice is logged. A model
that matches nothing gets its pipeline's own defaults, and a logged line says so.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from diffusers_hprune import toy
from diffusers_hprune.architecture import family_names, get_family, registered_families
from diffusers_hprune.architecture.inventory import builtin_configs, load_transformer_config
from diffusers_hprune.utils.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationProfile:
    """The call settings of one model.

    Attributes:
        name: the profile's key (also the built-in config name where there is one).
        display_name: the model's name in messages.
        repo_ids: the Hub repositories of the model.
        num_inference_steps: denoising steps.
        guidance_scale: the guidance strength; 0 means no guidance.
        guidance_argument: the pipeline argument that carries it (``guidance_scale``, or FLUX's
            ``true_cfg_scale`` for real classifier-free guidance).
        max_sequence_length: the T5 text length.
        resolution: image height and width.
        extra: further call arguments (e.g. the toy FLUX's empty negative prompt).
    """

    name: str
    display_name: str
    repo_ids: tuple[str, ...]
    num_inference_steps: int
    guidance_scale: float
    guidance_argument: str
    max_sequence_length: int
    resolution: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline call arguments of this profile."""
        return {"height": self.resolution, "width": self.resolution, "num_inference_steps": self.num_inference_steps,
                self.guidance_argument: self.guidance_scale, "max_sequence_length": self.max_sequence_length,
                **self.extra}


def _toy_profile(family: str) -> GenerationProfile:
    kwargs = toy.generation_kwargs(family)
    argument = "true_cfg_scale" if "true_cfg_scale" in kwargs else "guidance_scale"
    extra = {k: v for k, v in kwargs.items()
             if k not in ("height", "width", "num_inference_steps", argument, "max_sequence_length")}
    return GenerationProfile(f"toy-{family}", f"the {family} toy", (), kwargs["num_inference_steps"], kwargs[argument],
                             argument, kwargs["max_sequence_length"], kwargs["height"], extra)


def _published_profiles() -> list[GenerationProfile]:
    """The profile of every published model of every registered family (``ModelFamily.published_models``)."""
    return [GenerationProfile(name, **settings) for family in registered_families()
            for name, settings in family.published_models.items()]


#: Profile name -> profile: the published models of the built-in families, then the toys.
PROFILES: dict[str, GenerationProfile] = {p.name: p for p in (
    *_published_profiles(),
    *(_toy_profile(name) for name in toy.NAMES),
)}


def _profiles() -> dict[str, GenerationProfile]:
    """:data:`PROFILES` and the published models of families registered after it was built."""
    return {**PROFILES, **{p.name: p for p in _published_profiles() if p.name not in PROFILES}}


# Config entries that tell the shipped architectures apart (the rest are shared or names).
_SIGNATURE = ("_class_name", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "qk_norm", "dual_attention_layers", "guidance_embeds")


def _names(model: Any) -> list[str]:
    names = []
    if isinstance(model, (str, PurePath)):
        names.append(str(model))
    for holder in (model, getattr(model, "transformer", None)):
        if holder is None or isinstance(holder, (str, PurePath)):
            continue
        names.append(str(getattr(holder, "name_or_path", "") or ""))
        config = getattr(holder, "config", None)
        if isinstance(config, Mapping):
            names.append(str(config.get("_name_or_path", "") or ""))
    if isinstance(model, Mapping):
        names.append(str(model.get("_name_or_path", "") or ""))
    return [n for n in names if n]


def _by_name(name: str) -> GenerationProfile | None:
    family = toy.name_of(name.strip().rstrip("/"))
    if family:
        return PROFILES["toy-" + family]
    text = name.strip().rstrip("/").lower()
    base = text.split("/")[-1]
    for profile in _profiles().values():
        ids = {r.lower() for r in profile.repo_ids}
        if text in ids or base in {profile.name} | {r.split("/")[-1] for r in ids}:
            return profile
    return None


# What an entry missing from a config means (the Diffusers default).
_ABSENT = {"dual_attention_layers": [], "guidance_embeds": False}


def _signature(config: Mapping[str, Any]) -> dict[str, Any]:
    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    return {k: norm(config.get(k, _ABSENT.get(k))) for k in _SIGNATURE if k != "_class_name"}


@functools.cache
def _shipped_signatures(families: tuple[str, ...]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Built-in config name -> (family, signature), read from the shipped files once per set of families."""
    configs = {name: load_transformer_config(name) for name in builtin_configs()}
    return {name: (get_family(config).name, _signature(config)) for name, config in configs.items()}


def _same_architecture(name: str, family: str) -> tuple[str, ...]:
    """The published models whose built-in config is ``name``'s file (e.g. SD3.5 Large and Large Turbo)."""
    files = get_family(family).builtin_configs
    return tuple(other for other, file in files.items() if file == files[name]) if name in files else (name,)


def _by_config(model: Any) -> tuple[GenerationProfile, str] | None:
    transformer = getattr(model, "transformer", model)
    config = getattr(transformer, "config", transformer)
    if not isinstance(config, Mapping):
        return None
    try:
        family = get_family(config).name
    except UnsupportedModelError:
        return None
    signature = _signature(config)
    profiles = _profiles()
    for name, (shipped_family, shipped) in _shipped_signatures(family_names()).items():
        if shipped_family == family and signature == shipped:
            names = tuple(n for n in _same_architecture(name, family) if n in profiles)
            if names:
                return profiles[names[0]], " and ".join(names) if len(names) > 1 else ""
    return None


def identify(model: Any) -> tuple[GenerationProfile | None, str]:
    """The profile of ``model`` (a pipeline, transformer, config or name) and how it was found.

    The second value is ``""`` when a name identified the model, and otherwise says what was
    assumed (a config shared by several models, or no profile at all).
    """
    for name in _names(model):
        profile = _by_name(name)
        if profile is not None:
            return profile, ""
    found = _by_config(model)
    if found is not None:
        profile, shared = found
        if shared:
            return profile, (f"assumed {profile.display_name}: {shared} share this architecture and the model's name "
                             "does not say which; pass --steps and --guidance-scale for another")
        return profile, ""
    return None, "no generation profile for this model: using its pipeline's own defaults"


def pipeline_default_steps(pipe: Any, fallback: int = 28) -> int:
    """The ``num_inference_steps`` default of ``pipe.__call__``."""
    try:
        value = inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    except (KeyError, TypeError, ValueError):
        return fallback
    return value if isinstance(value, int) else fallback


_ANNOUNCED: set[tuple[str, str]] = set()


def generation_kwargs(pipe: Any, num_inference_steps=None, height=None, width=None, guidance_scale=None) -> dict:
    """The call arguments ``pipe`` draws with: its profile, then the given overrides (``None``: the profile's).

    A model without a profile gets its pipeline's own defaults; what was assumed is logged once per model.
    """
    profile, assumed = identify(pipe)
    kwargs = profile.call_kwargs() if profile is not None else {}
    if assumed:
        key = (";".join(_names(pipe)) or type(pipe).__name__, assumed)
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            logger.warning("%s: %s.", key[0], assumed)
    for name, value in (("num_inference_steps", num_inference_steps), ("height", height), ("width", width)):
        if value is not None:
            kwargs[name] = int(value)
    if guidance_scale is not None:
        kwargs[profile.guidance_argument if profile is not None else "guidance_scale"] = float(guidance_scale)
    kwargs.setdefault("num_inference_steps", pipeline_default_steps(pipe))
    return kwargs


__all__ = ["PROFILES", "GenerationProfile", "generation_kwargs", "identify", "pipeline_default_steps"]
