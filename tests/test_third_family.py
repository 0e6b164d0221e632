"""A model family registered from outside the package: plan, prune, save, load and budget run on it (issue 33).

The family here is what a user adding a model would write: a transformer class of their own (an MMDiT, built on
SD3's so the test stays small), a ``ModelFamily`` for it with its own name, classes and published pipeline, one
``register_family`` call, and a pruned class made with ``HierarchicalPrunedMixin``. Every stage must find all of
it through the registry: nothing in the package may assume the family is SD3 or FLUX.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config

from diffusers_hprune import (
    ModelFamily,
    PrunePlan,
    architecture,
    get_family,
    inspect_transformer,
    prune_transformer,
    register_family,
)
from diffusers_hprune.analysis import synthetic_report
from diffusers_hprune.architecture.published import VAE_16_CHANNELS_LAYOUT
from diffusers_hprune.budget import BudgetOptions, predict
from diffusers_hprune.families.sd3.structure import SD3Family
from diffusers_hprune.models import HierarchicalPrunedMixin, pruned_class_for
from diffusers_hprune.planning import make_plan
from diffusers_hprune.profiles import identify
from diffusers_hprune.toy.components import tiny_sd3_transformer_config


class ThirdMMDiT(SD3Transformer2DModel):
    """The user's own transformer class (not one of Diffusers' names)."""


class ThirdFamily(SD3Family):
    name = "third-mmdit"
    display_name = "A third MMDiT"
    base_class_name = "ThirdMMDiT"
    pruned_class_name = "PrunedThirdMMDiT"
    default_alpha = 0.3
    model_module = ""  # the pruned class below registers itself when it is defined
    pipeline_module = ""
    auto_pipeline_name = ""
    builtin_configs = {}
    published_models = {"third-mmdit-1": dict(display_name="Third MMDiT 1", repo_ids=("someone/third-mmdit-1",),
                                              num_inference_steps=6, guidance_scale=0.0,
                                              guidance_argument="guidance_scale", max_sequence_length=64,
                                              resolution=64)}
    published_components = {"text_encoder": 1_000_000, "vae": 2_000_000}
    published_vae_config = dict(VAE_16_CHANNELS_LAYOUT, block_out_channels=[32, 64], latent_channels=4,
                                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                scaling_factor=1.0, shift_factor=0.0)
    guidance_is_cfg = False
    paper_max_sequence_length = 64

    @property
    def base_class(self) -> type:
        return ThirdMMDiT


class PrunedThirdMMDiT(HierarchicalPrunedMixin, ThirdMMDiT):
    """As the built-in pruned classes: the stock signature plus ``prune_plan``, the structure built in ``__init__``."""

    family_name = "third-mmdit"

    @register_to_config
    def __init__(self, sample_size: int = 128, patch_size: int = 2, in_channels: int = 16, num_layers: int = 18,
                 attention_head_dim: int = 64, num_attention_heads: int = 18, joint_attention_dim: int = 4096,
                 caption_projection_dim: int = 1152, pooled_projection_dim: int = 2048, out_channels: int = 16,
                 pos_embed_max_size: int = 96, dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None,
                 prune_plan: dict | None = None):
        super().__init__(sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, num_layers=num_layers,
                         attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
                         joint_attention_dim=joint_attention_dim, caption_projection_dim=caption_projection_dim,
                         pooled_projection_dim=pooled_projection_dim, out_channels=out_channels,
                         pos_embed_max_size=pos_embed_max_size, dual_attention_layers=dual_attention_layers,
                         qk_norm=qk_norm)
        self._build_pruned_structure(prune_plan)


@pytest.fixture
def third(monkeypatch):
    """The family registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(architecture, "_FAMILIES", dict(architecture._FAMILIES))
    return register_family(ThirdFamily())


def _model() -> ThirdMMDiT:
    torch.manual_seed(0)
    return ThirdMMDiT(**tiny_sd3_transformer_config(num_layers=4)).eval()


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
            "pooled_projections": torch.randn(1, 64, generator=g), "timestep": torch.tensor([500.0])}


def test_a_family_whose_class_diffusers_lacks_does_not_stop_the_lookup_of_others(third):
    class Unlisted(ThirdFamily):
        name = "unlisted"
        base_class_name = "NoSuchTransformer2DModel"
        base_class = ModelFamily.base_class  # the default: Diffusers' class of that name, which does not exist

    register_family(Unlisted())
    assert get_family(_model()) is third and get_family(SD3Transformer2DModel) is get_family("sd3")


def test_the_registry_finds_the_third_family_before_the_family_of_its_base_class(third):
    model = _model()
    config = dict(model.config, _class_name="ThirdMMDiT")
    assert get_family(model) is third and get_family(ThirdMMDiT) is third and get_family(config) is third
    assert get_family(SD3Transformer2DModel) is get_family("sd3")  # the built-in family keeps its own class
    assert pruned_class_for(third) is PrunedThirdMMDiT and pruned_class_for("third-mmdit") is PrunedThirdMMDiT
    profile, assumed = identify("someone/third-mmdit-1")  # its published model's generation settings
    assert (profile.name, profile.num_inference_steps, profile.max_sequence_length, assumed) == ("third-mmdit-1", 6, 64, "")


def test_plan_prune_save_and_load_a_third_family(third, tmp_path):
    model = _model()
    config = dict(model.config, _class_name="ThirdMMDiT")
    plan = make_plan(synthetic_report(config).contributions(), inspect_transformer(config), ratio=0.3).plan
    assert plan.family == "third-mmdit" and plan.removed_blocks  # planned with the family's own structure
    plan = PrunePlan(removed_blocks=plan.removed_blocks, removed_components={0: ["ff_context"]}, family=plan.family,
                     num_blocks=plan.num_blocks)  # a component inside a block too, not only whole blocks
    pruned = prune_transformer(model, plan)
    assert type(pruned) is PrunedThirdMMDiT and pruned.family is third
    with torch.no_grad():
        expected = pruned(**_inputs(), return_dict=False)[0]
    assert pruned.num_parameters() < model.num_parameters()

    pruned.save_pretrained(tmp_path / "pruned")
    loaded = PrunedThirdMMDiT.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.prune_plan.removed_blocks == pruned.prune_plan.removed_blocks
    assert loaded.prune_plan.removed_components == {0: ["ff_context"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_inputs(), return_dict=False)[0], expected, rtol=0, atol=0)


def test_the_budget_of_a_third_family_uses_its_published_pipeline(third):
    config = dict(tiny_sd3_transformer_config(num_layers=4), _class_name="ThirdMMDiT")
    budget = predict(config, ratio=0.3, options=BudgetOptions(resolution=64, inference_resolution=64))
    analysis = budget.stage("analysis")
    loading = " (checkpoint files, mapped while loading)"
    files = {k.removesuffix(loading): v for k, v in analysis.host.items() if k.endswith(loading)}
    assert files == {"text_encoder": 2 * 1_000_000, "vae": 2 * 2_000_000,  # bf16 bytes of its own components
                     "transformer": files["transformer"]}
    # on the device while it draws: the VAE beside the transformer (its prompts were encoded before)
    on_device = {k.split(" ")[0]: v for k, v in analysis.device.items() if k.endswith("(weights)")
                 and not k.startswith("transformer")}
    assert on_device == {"vae": 2 * 2_000_000}
    assert budget.removed_fraction > 0

    sd3 = predict(dict(config, _class_name="SD3Transformer2DModel"), ratio=0.3,
                  options=BudgetOptions(resolution=64, inference_resolution=64))
    # SD3's T5: the family decides, not the config
    assert f"text_encoder_3{loading}" in sd3.stage("analysis").host
