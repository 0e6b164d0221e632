"""`hprune export` / `push --format`: pruned models that load with stock Diffusers alone.

Stock format: the stock transformer class with fewer blocks draws the pruned model's image.
Remote format: the generated modeling file loads in a process that cannot import diffusers_hprune.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MIXED_PLANS, fill_hf_cache, tiny_pipeline, transformer_inputs

from diffusers_hprune import PrunePlan, get_family, prune_pipeline
from diffusers_hprune.cli import main
from diffusers_hprune.hub import (
    PLAN_FILE,
    ExportError,
    export_folder,
    folder_format,
    folder_plan,
    modeling_source,
    original_blocks,
    write_model_card,
)
from diffusers_hprune.hub import remote_code as remote_code_module
from diffusers_hprune.hub.remote_code import RemoteCodeError
from diffusers_hprune.models import pruned_class_for
from diffusers_hprune.utils.errors import PlanError

PROMPT = "a red circle left of a blue square"
CALL = dict(height=16, width=16, num_inference_steps=2, max_sequence_length=16, output_type="np")

BLOCKS_ONLY = {  # the tiny SD3 has 4 blocks, 0 and 1 with dual attention; the tiny FLUX 2 double + 3 single
    "sd3": PrunePlan(removed_blocks=[1, 3], family="sd3", num_blocks=4),  # the last block goes: 2 becomes last
    "sd3-dual-last": PrunePlan(removed_blocks=[2, 3], family="sd3", num_blocks=4),  # a dual block becomes last
    "flux": PrunePlan(removed_blocks=[0, 3], family="flux", num_blocks=5),
}
WITH_COMPONENTS = MIXED_PLANS

# Runs in a fresh process that cannot import diffusers_hprune: only stock Diffusers is there.
LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["diffusers_hprune"] = None  # `import diffusers_hprune` raises ImportError from here on
    import numpy as np, torch
    from diffusers import AutoModel, DiffusionPipeline
    source, out, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "remote"
    if len(sys.argv) > 6:  # offline Hub cache: Diffusers asks the Hub API for the commit of remote code; answer as it would
        import types
        import diffusers.utils.dynamic_modules_utils as dynamic
        dynamic.model_info = lambda repo_id, revision=None, token=None: types.SimpleNamespace(sha=sys.argv[6])
    call = json.loads(sys.argv[4])
    kwargs = {"trust_remote_code": True} if remote else {}
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    np.save(out, pipe(sys.argv[5], generator=torch.Generator().manual_seed(0), **call).images)
    model = AutoModel.from_pretrained(source, subfolder="transformer", **kwargs)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pipe.transformer.state_dict().values()))
    print(json.dumps({"pipeline": type(pipe).__name__, "transformer": type(pipe.transformer).__name__,
                      "module": type(pipe.transformer).__module__, "auto_model": type(model).__name__,
                      "auto_model_same_weights": same, "package_importable": "diffusers_hprune" in sys.modules
                      and sys.modules["diffusers_hprune"] is not None}))
    """
)


def _pipe(family: str):
    return tiny_pipeline(family)


def _image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


def _stock_transformer(pruned):
    """The stock model that the family's stock_config / stock_state_dict make of a pruned transformer."""
    family = get_family(pruned)
    config, plan = dict(pruned.config), pruned.prune_plan
    stock = family.base_class.from_config(family.stock_config(config, plan))
    missing, unexpected = stock.load_state_dict(family.stock_state_dict(pruned.state_dict(), config, plan), strict=False)
    assert missing == [] and unexpected == []  # the stock model's keys exactly, nothing random, nothing left over
    return stock


@pytest.mark.parametrize("name", list(BLOCKS_ONLY))
def test_stock_model_draws_the_pruned_models_image(name):
    pipe = _pipe(name)
    plan = BLOCKS_ONLY[name]
    pruned = prune_pipeline(pipe, plan)
    expected = _image(pruned)
    stock = _stock_transformer(pruned.transformer)
    assert type(stock) is get_family(plan.family).base_class
    kept = plan.num_blocks - len(plan.removed_blocks)
    if plan.family == "sd3":
        assert stock.config.num_layers == kept
        last = stock.transformer_blocks[-1]
        assert last.context_pre_only and last.ff_context is None and last.attn.to_add_out is None
        original_dual = [i for i in (0, 1) if i not in plan.removed_blocks]
        assert len(stock.config.dual_attention_layers) == len(original_dual)
        assert [b.use_dual_attention for b in stock.transformer_blocks] == [
            i in (0, 1) for i in range(plan.num_blocks) if i not in plan.removed_blocks]
    else:
        assert (stock.config.num_layers, stock.config.num_single_layers) == (1, 2)
    image = _image(type(pipe)(**{**pipe.components, "transformer": stock}))
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert np.abs(expected - _image(pipe)).max() > 1e-3  # the removed blocks change the image


def test_stock_export_refuses_component_removal():
    family = get_family("flux")
    with pytest.raises(PlanError, match=r"block 1: ff.*Export without --stock"):
        family.stock_config({"num_layers": 2, "num_single_layers": 3}, WITH_COMPONENTS["flux"])


def test_nf4_folders_export_to_stock(tmp_path):
    from diffusers_hprune.quantization import quantize_pipeline
    from diffusers_hprune.utils.nf4_cpu import compute_in_fp32_on_cpu, cpu_nf4_loading, keep_cpu_layout

    pipe = _pipe("sd3")
    for name, blocks in (("keeps-last", [1]), ("drops-last", [1, 3])):
        plan = PrunePlan(removed_blocks=blocks, family="sd3", num_blocks=4)
        prune_pipeline(pipe, plan).save_pretrained(tmp_path / name)
        quantize_pipeline(tmp_path / name, tmp_path / f"{name}-nf4")
    # 4-bit weights are renamed, not changed: the stock class loads them (here through the CPU loading hook).
    export = export_folder(tmp_path / "keeps-last-nf4", tmp_path / "stock-nf4")
    pruned = pruned_class_for("sd3").from_pretrained(tmp_path / "keeps-last-nf4" / "transformer")
    with cpu_nf4_loading():
        stock, info = get_family("sd3").base_class.from_pretrained(export / "transformer", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    keep_cpu_layout(stock)
    compute_in_fp32_on_cpu(stock)
    inputs = transformer_inputs(pruned)
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).sample, pruned(**inputs).sample, rtol=0, atol=1e-5)
    # Removing the last block would cut a 4-bit weight: refused, naming the ways that work.
    with pytest.raises(PlanError, match=r"transformer_blocks\.2 becomes the last block.*--format remote"):
        export_folder(tmp_path / "drops-last-nf4", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """For each family, a blocks-only folder exported stock and a folder with components exported remote."""
    out = {}
    for family in ("sd3", "flux"):
        pipe = _pipe(family)
        for kind, plans in (("stock", BLOCKS_ONLY), ("remote", WITH_COMPONENTS)):
            base = tmp_path_factory.mktemp(f"{family}-{kind}")
            pruned = prune_pipeline(pipe, plans[family])
            pruned.save_pretrained(base / "pruned")
            (base / "pruned" / "checkpoint-10").mkdir()
            (base / "pruned" / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
            write_model_card(base / "pruned", base_model=f"someone/base-{family}", repo_id=f"someone/{family}-{kind}")
            export = export_folder(base / "pruned", base / "export")
            out[family, kind] = (base / "pruned", export, plans[family], _image(pruned))
    return out


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_export_folders_describe_their_format(exports, family):
    stock_src, stock, plan, _ = exports[family, "stock"]
    index = json.loads((stock / "model_index.json").read_text())
    base = get_family(family)
    assert index["_class_name"] in ("StableDiffusion3Pipeline", "FluxPipeline")
    assert index["transformer"] == ["diffusers", base.base_class_name] and "auto_map" not in index
    config = json.loads((stock / "transformer" / "config.json").read_text())
    assert config["_class_name"] == base.base_class_name and "prune_plan" not in config
    assert folder_format(stock) == "stock" and folder_plan(stock)[1] == plan
    blocks = original_blocks(stock)  # the side file maps exported blocks back to the original indices
    kept = [s.path for s in base.block_specs(folder_plan(stock)[0]) if s.index not in plan.removed_blocks]
    assert sorted(blocks.values()) == sorted(kept) and (stock / "transformer" / PLAN_FILE).is_file()
    assert not (stock / "checkpoint-10").exists()  # training leftovers stay home
    card = (stock / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("someone/{family}-stock", dtype=torch.bfloat16)' in card
    assert "trust_remote_code" not in card and "import diffusers_hprune" not in card
    assert "pip install diffusers-hprune" not in card and "not on PyPI" in card
    assert f"hprune convert-lora LORA.safetensors --to\nsomeone/{family}-stock" in card  # blocks renumbered

    _, remote, plan, _ = exports[family, "remote"]
    index = json.loads((remote / "model_index.json").read_text())
    class_name = json.loads((remote / "transformer" / "config.json").read_text())["_class_name"]
    assert index["transformer"] == ["hprune_transformer", class_name]
    assert index["auto_map"] == {"AutoModel": f"hprune_transformer.{class_name}"}
    config = json.loads((remote / "transformer" / "config.json").read_text())
    assert config["auto_map"] == index["auto_map"] and PrunePlan.from_dict(config["prune_plan"]) == plan
    code = (remote / "transformer" / "hprune_transformer.py").read_text()
    assert code == modeling_source()  # generated from this package's source, nothing else
    assert not re.search(r"^\s*(import|from)\s+diffusers_hprune\b", code, flags=re.MULTILINE)
    card = (remote / "README.md").read_text()
    assert f'from_pretrained("someone/{family}-remote", trust_remote_code=True' in card
    assert 'subfolder="transformer", trust_remote_code=True' in card
    # The folder that was exported is unchanged: still the pruned pipeline class, no code beside it.
    assert json.loads((stock_src / "model_index.json").read_text())["_class_name"].startswith("HierarchicalPruned")


def test_export_refusals(exports, tmp_path, capsys):
    source, export, _, _ = exports["flux", "remote"]
    with pytest.raises(PlanError, match="Export without --stock"):
        export_folder(source, tmp_path / "x", format="stock")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="exists; choose another --out or pass --overwrite"):
        export_folder(source, export)
    with pytest.raises(ExportError, match="is an export already"):
        export_folder(export, tmp_path / "y")
    with pytest.raises(ExportError, match="is inside FOLDER"):
        export_folder(source, source / "sub")
    with pytest.raises(ExportError, match="is a folder that holds FOLDER"):  # --overwrite would delete the source
        export_folder(source, source.parent, overwrite=True)
    assert (source / "model_index.json").is_file()
    mine = tmp_path / "mine"  # a folder of the user's, mistyped as --out: --overwrite must not delete it
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    assert main(["export", str(source), "--out", str(mine), "--overwrite"]) == 2
    assert "holds files that are not a pipeline folder ('thesis.tex')" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    export_folder(source, export, overwrite=True)  # an earlier export (a pipeline folder) is replaced
    assert main(["export", str(source), "--out", str(tmp_path / "z"), "--stock"]) == 2
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("a, b, message", [
    ("def helper():\n    return 1\n", "def helper():\n    return 2\n", "both define 'helper'"),
    ("from os import path\n", "path = 3\n", "defines 'path', a name another module imports"),
    ("import json\n", "from diffusers_hprune.plan import PrunePlan as Plan\n", "imports PrunePlan as Plan"),
])
def test_modeling_source_refuses_what_one_namespace_cannot_hold(monkeypatch, tmp_path, a, b, message):
    # Joined into one file, two modules' top-level names share one namespace: a clash would silently shadow.
    (tmp_path / "joined_a.py").write_text(a)
    (tmp_path / "joined_b.py").write_text(b)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("joined_a", "joined_b"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # each case imports its own files
    monkeypatch.setattr(remote_code_module, "MODULES", ("joined_a", "joined_b"))
    with pytest.raises(RemoteCodeError, match=re.escape(message)):
        remote_code_module.modeling_source()


def _load_without_package(tmp_path, source, kind, env=None, commit=None):
    out = tmp_path / f"{kind}.npy"
    args = [sys.executable, "-c", LOADER, str(source), str(out), kind, json.dumps(CALL), PROMPT] + ([commit] if commit else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), **(env or {})}
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_the_committed_modeling_file_is_what_an_export_uploads():
    """pipelines/hprune_transformer.py is the code a Hub user runs with trust_remote_code=True, readable in the
    repository: it must be exactly what this version's export writes."""
    committed = Path(__file__).resolve().parents[1] / "pipelines" / "hprune_transformer.py"
    assert committed.read_text(encoding="utf-8") == modeling_source(), (
        "pipelines/hprune_transformer.py is stale: run `python pipelines/generate.py` and commit the result")


@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_exports_load_without_the_package(exports, tmp_path, family):
    for kind in ("stock", "remote"):
        _, export, _, expected = exports[family, kind]
        info, image = _load_without_package(tmp_path, export, kind)
        assert not info["package_importable"]
        assert info["pipeline"] in ("StableDiffusion3Pipeline", "FluxPipeline")
        if kind == "stock":
            assert info["module"].startswith("diffusers.") and info["transformer"] == get_family(family).base_class_name
        else:
            assert info["module"].startswith("diffusers_modules.") and info["transformer"].startswith("HierarchicalPruned")
        assert info["auto_model"] == info["transformer"] and info["auto_model_same_weights"]
        np.testing.assert_allclose(image, expected, atol=1e-5)


SWAPPING = """
import json, sys
sys.modules["diffusers_hprune"] = None  # stock Diffusers and the export's own modeling code only
import numpy as np, torch
import diffusers
from diffusers import AutoModel, DiffusionPipeline
export, family, call, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
prefix = {"sd3": "StableDiffusion3", "flux": "Flux"}[family]
pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
reference = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
out = {}
for kind in ("Img2Img", "Inpaint"):
    cls = getattr(diffusers, prefix + kind + "Pipeline")
    try:
        cls.from_pipe(pipe)
        out[kind + " plain"] = "ok"
    except ValueError as e:
        out[kind + " plain"] = "transformer" in str(e) and "expected" in str(e)
    swapped = cls.from_pipe(pipe, transformer=pipe.transformer)  # the documented way
    out[kind] = swapped.transformer is pipe.transformer
t = AutoModel.from_pretrained(export, subfolder="transformer", trust_remote_code=True)
try:
    DiffusionPipeline.from_pretrained(export, transformer=t, trust_remote_code=True)
    out["transformer=t"] = "ok"
except (ValueError, ImportError) as e:  # Diffusers 0.42 says why; 0.41 lets the ModuleNotFoundError through
    out["transformer=t"] = "hprune_transformer" in str(e)
later = DiffusionPipeline.from_pretrained(export, transformer=None, trust_remote_code=True)
later.transformer = t
later.set_progress_bar_config(disable=True)
image = later(prompt, generator=torch.Generator().manual_seed(0), **call).images
out["set later"] = float(np.abs(image - reference).max())
print(json.dumps(out))
"""


@pytest.mark.parametrize("family", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_remote_export_component_swapping_with_stock_diffusers(exports, tmp_path, family):
    """What docs/sharing.md says of a remote export's component swapping with stock Diffusers alone: from_pipe
    needs the transformer passed, from_pretrained(transformer=t) is refused by Diffusers, setting it works."""
    _, export, _, _ = exports[family, "remote"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", SWAPPING, str(export), family, json.dumps(CALL), PROMPT],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"Img2Img plain": True, "Img2Img": True, "Inpaint plain": True, "Inpaint": True,
                   "transformer=t": True, "set later": 0.0}, out


@pytest.mark.slow  # fresh processes from an offline Hub cache: CI's second step
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exports_load_by_repo_id_from_an_offline_cache(exports, tmp_path, family):
    for kind in ("stock", "remote"):
        _, export, _, expected = exports[family, kind]
        repo_id = f"someone/{family}-{kind}"
        snapshot = fill_hf_cache(export, repo_id, tmp_path / "hub")
        info, image = _load_without_package(tmp_path, repo_id, kind, commit=snapshot.name,
                                            env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)})
        assert not info["package_importable"] and info["auto_model_same_weights"]
        np.testing.assert_allclose(image, expected, atol=1e-5)


def test_remote_export_without_trust_names_the_way_out(exports, tmp_path):
    _, export, _, _ = exports["sd3", "remote"]
    code = ("import sys\nsys.modules['diffusers_hprune'] = None\nfrom diffusers import DiffusionPipeline\n"
            f"DiffusionPipeline.from_pretrained({str(export)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")})
    assert result.returncode != 0
    assert "trust_remote_code=True" in result.stderr and "hprune_transformer.py" in result.stderr
    # The file Diffusers points to names the other way: the package, installed from source.
    header = (export / "transformer" / "hprune_transformer.py").read_text().split('"""')[1]
    assert "trust_remote_code=True" in header and "install diffusers-hprune" in header and "not on PyPI" in header


def test_sharded_transformer_exports_to_stock(tmp_path):
    """Shards are rewritten one by one and the index names the renumbered keys (a 16 GB model is sharded)."""
    from diffusers import DiffusionPipeline

    pruned = prune_pipeline(_pipe("sd3"), BLOCKS_ONLY["sd3"])
    pruned.save_pretrained(tmp_path / "pruned")
    shutil.rmtree(tmp_path / "pruned" / "transformer")
    pruned.transformer.save_pretrained(tmp_path / "pruned" / "transformer", max_shard_size="20KB")
    export = export_folder(tmp_path / "pruned", tmp_path / "export")
    index = json.loads((export / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (export / "transformer").glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    stock = DiffusionPipeline.from_pretrained(export)
    stock.set_progress_bar_config(disable=True)
    assert set(index["weight_map"]) == set(stock.transformer.state_dict())
    np.testing.assert_allclose(_image(stock), _image(pruned), atol=1e-5)
