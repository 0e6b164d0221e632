"""Family knowledge on the real public configs (meta device), and `hprune inspect`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffusers_hprune import BLOCK, get_family, inspect_transformer, load_transformer_config
from diffusers_hprune.architecture.inventory import build_on_meta
from diffusers_hprune.cli import main

EXPECTED_TOTALS = {"sd3.5-large": 8_056_627_520, "flux.1-schnell": 11_891_178_560}


@pytest.mark.parametrize("name,total", sorted(EXPECTED_TOTALS.items()))
def test_public_config_totals(name, total):
    inventory = inspect_transformer(name)
    assert inventory.original_params == total == inventory.params
    assert inventory.non_block_params + sum(b.params for b in inventory.blocks) == total


def test_sd35_large_structure():
    config = load_transformer_config("sd3.5-large")
    family = get_family(config)
    specs = family.block_specs(config)
    assert family.name == "sd3" and len(specs) == 38
    assert config["num_attention_heads"] == 38 and config["attention_head_dim"] == 64
    assert [s.context_pre_only for s in specs] == [False] * 37 + [True]
    assert specs[-1].components == ("attn", "ff", "norm1", "norm1_context")
    assert not any(s.dual_attention for s in specs)
    inv = inspect_transformer(config)
    # Every non-last block is alike; the last has no ff_context and a smaller text modulation.
    assert len({b.params for b in inv.blocks[:-1]}) == 1
    assert inv.blocks[-1].params < inv.blocks[0].params
    dim = 38 * 64
    assert inv.blocks[0].components["norm1"] == dim * 6 * dim + 6 * dim
    assert inv.blocks[-1].components["norm1_context"] == dim * 2 * dim + 2 * dim


def test_sd35_medium_dual_attention_layers():
    config = load_transformer_config("sd3.5-medium")
    specs = get_family(config).block_specs(config)
    assert [s.index for s in specs if s.dual_attention] == list(range(13))
    inv = inspect_transformer(config)
    # attn2 belongs to `attn`: dual blocks hold more attention parameters; norm1 is the 9-way modulation.
    assert inv.blocks[0].components["attn"] > inv.blocks[13].components["attn"]
    assert inv.blocks[0].components["norm1"] == 1536 * 9 * 1536 + 9 * 1536


def test_flux_schnell_global_indices():
    config = load_transformer_config("flux.1-schnell")
    specs = get_family(config).block_specs(config)
    assert len(specs) == 57
    assert [s.kind for s in specs] == ["double"] * 19 + ["single"] * 38
    assert specs[19].path == "single_transformer_blocks.0" and specs[56].path == "single_transformer_blocks.37"
    inv = inspect_transformer(config)
    dim, mlp = 24 * 128, 4 * 24 * 128
    single = inv.blocks[19]
    assert single.components["mlp"] == dim * mlp + mlp + dim * mlp  # proj_mlp + its proj_out columns
    assert single.params == sum(single.components.values()) + dim  # + proj_out.bias


def test_inventory_of_a_pruned_config_marks_removed_parts():
    from diffusers_hprune import PrunePlan

    config = load_transformer_config("flux.1-schnell")
    config["prune_plan"] = PrunePlan(removed_blocks=[56], removed_components={3: ["ff"]}, family="flux", num_blocks=57).to_dict()
    inv = inspect_transformer(config)
    assert inv.blocks[56].status == "removed" and inv.blocks[3].status == "pruned"
    assert inv.params == EXPECTED_TOTALS["flux.1-schnell"] - inv.blocks[56].params - inv.blocks[3].components["ff"]
    pruned = build_on_meta(config)
    assert sum(p.numel() for p in pruned.parameters()) == inv.params


def test_inspect_cli_prints_table_and_totals(capsys):
    assert main(["inspect", "sd3.5-large"]) == 0
    out = capsys.readouterr().out
    # 2 bytes a parameter plus the 192 x 192 x 2432 positional-embedding table the checkpoint stores
    assert "8,056,627,520 parameters" in out and "16.29 GB" in out
    assert "transformer_blocks.37" in out
    lines = [line for line in out.splitlines() if line.startswith("37 ")]
    assert len(lines) == 1 and "joint" in lines[0]


def test_inspect_cli_json_and_folder(tmp_path, capsys, sd3_pipeline):
    sd3_pipeline.save_pretrained(tmp_path / "pipe")
    assert main(["inspect", str(tmp_path / "pipe"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "sd3" and len(data["blocks"]) == 4
    assert data["params"] == sum(p.numel() for p in sd3_pipeline.transformer.parameters())


def test_inspect_cli_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "neither config.json nor transformer/config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert main(["inspect", str(tmp_path / "config.json")]) == 2
    assert "Supported families" in capsys.readouterr().err


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_hprune", "inspect", "flux.1-schnell"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "11,891,178,560 parameters" in result.stdout
    assert "single_transformer_blocks.37" in result.stdout


def test_block_counts_match_component_sums_on_meta():
    for name in ("sd3.5-large", "sd3.5-medium", "sd3-medium", "flux.1-dev"):
        config = load_transformer_config(name)
        family = get_family(config)
        model = build_on_meta(config)
        for spec, block in zip(family.block_specs(config), family.block_modules(model)):
            total = family.component_numel(block, spec, BLOCK, config)
            assert total == sum(p.numel() for p in block.parameters())
            assert sum(family.component_numel(block, spec, c, config) for c in spec.components) <= total


REGISTER_FIRST = """
from diffusers_hprune.architecture import ModelFamily, family_names, get_family, register_family

class Other(ModelFamily):
    name = "other"
    display_name = "Another family"
    base_class_name = "DiTTransformer2DModel"

register_family(Other())  # before any lookup
print(",".join(family_names()), get_family("sd3").name, get_family("flux").name, get_family("other").name)
"""


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_registering_a_family_first_keeps_the_builtin_ones():
    result = subprocess.run([sys.executable, "-c", REGISTER_FIRST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["sd3,flux,other", "sd3", "flux", "other"]


def test_a_family_from_outside_the_package_is_found_and_duplicates_are_refused(monkeypatch):
    """A third family, defined here: found by name, by config and by a transformer of its class; names are unique."""
    from diffusers import DiTTransformer2DModel

    from diffusers_hprune import ModelFamily, UnsupportedModelError, architecture, family_names

    class DiTFamily(ModelFamily):
        name = "dit"
        display_name = "DiT"
        base_class_name = "DiTTransformer2DModel"
        pruned_class_name = "PrunedDiT"
        component_names = ("attn", "ff")

    monkeypatch.setattr(architecture, "_FAMILIES", dict(architecture._FAMILIES))  # undone after the test
    with pytest.raises(UnsupportedModelError, match="takes a ModelFamily instance"):
        architecture.register_family(DiTFamily)  # the class, not an instance
    family = architecture.register_family(DiTFamily())
    assert family_names() == ("sd3", "flux", "dit")
    assert get_family("dit") is family and get_family({"_class_name": "DiTTransformer2DModel"}) is family
    model = DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=4, num_layers=1,
                                  sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    assert get_family(model) is family
    with pytest.raises(UnsupportedModelError, match="'sd3' is registered already"):
        architecture.register_family(type(get_family("sd3"))())
    with pytest.raises(UnsupportedModelError, match="'dit' is registered already"):
        architecture.register_family(DiTFamily())
    with pytest.raises(UnsupportedModelError, match="dit \\(DiT: DiTTransformer2DModel\\)"):
        get_family("unknown")  # the error lists every family, the new one too


def test_each_family_names_the_classes_its_modules_define():
    """Diffusers finds a family's classes by the names the family declares, before their modules are imported: the
    declared names must be the classes its model and pipeline modules define, under the public names too."""
    import diffusers

    import diffusers_hprune
    from diffusers_hprune import family_names
    from diffusers_hprune.models import pruned_class_for
    from diffusers_hprune.pipelines import family_pipelines

    for name in family_names():
        family = get_family(name)
        pipelines = sorted(pruned.__name__ for _, pruned in family_pipelines(family).values())
        assert sorted(family.pipeline_class_names) == pipelines, name
        assert pruned_class_for(family).__name__ == family.pruned_class_name, name
        for cls_name in family.class_modules():
            assert getattr(diffusers, cls_name) is getattr(diffusers_hprune, cls_name), cls_name
