"""The toy trainer: deep toys built on the shipped toys' components, and training that resumes step for step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffusers_hprune import toy
from diffusers_hprune.toy import train, train_state
from diffusers_hprune.utils.checks import InputError


@pytest.fixture
def small_deep(monkeypatch):
    """The deep SD3 toy's code path (shipped encoders, VAE, scheduler) with a 2-block transformer, for speed."""
    monkeypatch.setitem(train.TOY_CONFIGS, "sd3-deep", dict(train.TOY_CONFIGS["sd3-deep"], num_layers=2))


def _train(out, steps, **kw):
    return train.train_transformer("sd3-deep", None, out, minutes=30, batch=4, n_images=32, max_steps=steps,
                                   eval_prompts=0, **kw)


def test_deep_configs_have_the_seed_models_depths():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(**train.TOY_CONFIGS["sd3-deep"])
        flux = FluxTransformer2DModel(**train.TOY_CONFIGS["flux-deep"])
    assert len(sd3.transformer_blocks) == 38  # SD3.5 Large
    assert [b.context_pre_only for b in sd3.transformer_blocks] == [False] * 37 + [True]
    assert not any(b.attn2 is not None for b in sd3.transformer_blocks)  # no dual attention, unlike Medium
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)  # FLUX.1


def test_deep_toy_takes_every_component_but_the_transformer_from_the_shipped_toy(small_deep):
    deep = train.build_toy_pipeline("sd3-deep")
    shipped = toy.load_pipeline("sd3")
    assert type(deep) is type(shipped)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        ours, theirs = getattr(deep, name).state_dict(), getattr(shipped, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert deep.tokenizer.get_vocab() == shipped.tokenizer.get_vocab()
    assert len(deep.transformer.transformer_blocks) == 2


def test_training_resumes_step_for_step(tmp_path, small_deep):
    whole = _train(tmp_path / "whole", 4)
    _train(tmp_path / "parts", 2)
    first = json.loads((train_state.state_folder(tmp_path / "parts") / "state.json").read_text())
    assert first["step"] == 2 and first["runs"] == 1
    parts = _train(tmp_path / "parts", 4)
    saved = train_state.read_settings(train_state.state_folder(parts))
    assert (saved["step"], saved["runs"]) == (4, 2)
    a = load_file(str(train_state.state_folder(whole) / "state-4.safetensors"))
    b = load_file(str(train_state.state_folder(parts) / "state-4.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("adam.") for k in a) and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not (train_state.state_folder(parts) / "state-2.safetensors").exists()  # the superseded state is gone
    info = json.loads((parts / "training.json").read_text())
    assert (info["name"], info["family"], info["steps"], info["runs"]) == ("sd3-deep", "sd3", 4, 2)
    # the saved pipeline is the EMA of the training, loadable by stock Diffusers
    pipe = toy.load_pipeline(parts)
    assert len(pipe.transformer.transformer_blocks) == 2


def test_a_state_of_other_settings_is_refused(tmp_path, small_deep):
    _train(tmp_path / "run", 1)
    with pytest.raises(InputError, match=r"another run \(lr differ: lr 0.0008 there, 0.001 now\)"):
        _train(tmp_path / "run", 2, lr=1e-3)


def test_toy_names():
    assert toy.NAMES == ("sd3", "flux", "sd3-deep", "flux-deep")
    assert [toy.toy_family(n) for n in toy.NAMES] == ["sd3", "flux", "sd3", "flux"]
    assert toy.name_of("toy-flux-deep") == "flux-deep" and toy.name_of("sd3-deep", names=False) is None
    assert toy.generation_kwargs("flux-deep") == toy.generation_kwargs("flux")
    assert {"sd3", "flux"} <= set(toy.shipped()) <= set(toy.NAMES)
    with pytest.raises(ValueError, match="Unknown toy 'sd4'; choose one of sd3, flux, sd3-deep, flux-deep"):
        toy.model_path("sd4")


def test_the_trainer_refuses_a_vae_for_a_deep_toy(capsys):
    with pytest.raises(SystemExit):
        train.main(["sd3-deep", "--out", "x", "--vae", "y"])
    assert "takes the shipped sd3 toy's VAE and text encoders; leave --vae out" in capsys.readouterr().err
