"""Per-model generation profiles: every stage draws a model the way it is meant to run, flags override."""

from __future__ import annotations

import logging

import pytest

from diffusers_hprune import toy
from diffusers_hprune.architecture.inventory import build_on_meta, load_transformer_config
from diffusers_hprune.loading import generation_settings
from diffusers_hprune.profiles import PROFILES, generation_kwargs, identify


def _nameless(name: str) -> dict:
    return {k: v for k, v in load_transformer_config(name).items() if k != "_name_or_path"}


@pytest.mark.parametrize("name", ["sd3.5-large-turbo", "flux.1-schnell"])
def test_the_four_step_models_run_four_steps_without_guidance(name):
    for model in (name, load_transformer_config(name) if name == "flux.1-schnell" else name):
        profile, assumed = identify(model)
        assert profile.name == name and assumed == ""
        kwargs = profile.call_kwargs()
        assert kwargs["num_inference_steps"] == 4
        assert kwargs[profile.guidance_argument] == 0.0 and profile.guidance_argument == "guidance_scale"
        assert kwargs["height"] == kwargs["width"] == 1024 and kwargs["max_sequence_length"] == 256


def test_models_are_identified_by_repo_id_folder_name_and_config():
    assert identify("stabilityai/stable-diffusion-3.5-large-turbo")[0].name == "sd3.5-large-turbo"
    assert identify("/models/stable-diffusion-3.5-large")[0].name == "sd3.5-large"
    assert identify("black-forest-labs/FLUX.1-dev")[0].call_kwargs()["max_sequence_length"] == 512
    # Without a name the architecture decides; every shipped config finds its own model, built or not.
    for name in ("sd3.5-medium", "sd3-medium", "flux.1-schnell", "flux.1-dev"):
        assert identify(_nameless(name))[0].name == name
        assert identify({k: v for k, v in build_on_meta(_nameless(name)).config.items()
                         if k != "_name_or_path"})[0].name == name
    # SD3.5 Large and Large Turbo share an architecture: the assumption is said, and names both.
    profile, assumed = identify(_nameless("sd3.5-large"))
    assert profile.name == "sd3.5-large" and "sd3.5-large-turbo" in assumed and "--steps" in assumed


def test_the_toys_profiles_are_their_own_settings():
    assert {"sd3", "flux"} <= set(toy.shipped())
    for family in toy.shipped():
        pipe = toy.load_pipeline(family)
        assert identify(pipe)[0].name == f"toy-{family}"
        assert generation_settings(pipe) == toy.generation_kwargs(family)
    flux = toy.load_pipeline("flux")
    assert generation_settings(flux, guidance_scale=2.0)["true_cfg_scale"] == 2.0  # FLUX toy: real CFG


def test_flags_override_the_profile_and_an_unknown_model_gets_its_pipeline_defaults(caplog):
    class Pipe:  # a pipeline of an unknown model: only the call signature matters here
        name_or_path = "someone/some-model"
        config = {"_name_or_path": "someone/some-model"}

        def __call__(self, prompt=None, num_inference_steps: int = 17):
            pass

    with caplog.at_level(logging.WARNING, logger="diffusers_hprune.profiles"):
        kwargs = generation_kwargs(Pipe())
        again = generation_kwargs(Pipe())
    assert kwargs == again == {"num_inference_steps": 17}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "someone/some-model" in lines[0] and "pipeline's own defaults" in lines[0]
    turbo = type("Turbo", (Pipe,), {"name_or_path": "stabilityai/stable-diffusion-3.5-large-turbo"})()
    assert generation_kwargs(turbo, num_inference_steps=8, height=512, width=768, guidance_scale=1.5) == {
        **PROFILES["sd3.5-large-turbo"].call_kwargs(), "num_inference_steps": 8, "height": 512, "width": 768,
        "guidance_scale": 1.5}
