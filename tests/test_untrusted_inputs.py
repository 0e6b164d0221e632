"""Issue 32, deliverable 1: a folder the user did not write (a Hub download, a git clone) is untrusted.

Component names from ``model_index.json`` are never paths out of the folder, symbolic links are never followed out of
an input into an output or an upload, an export carries no code or ``auto_map`` the project did not write.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import MIXED_PLANS, folder_state, tiny_pipeline

from diffusers_hprune import PrunePlan, prune_pipeline, toy
from diffusers_hprune.cli import main
from diffusers_hprune.hub.export import ExportError, check_export, export_folder
from diffusers_hprune.hub.push import exported
from diffusers_hprune.quantization.folder import quantize_pipeline
from diffusers_hprune.utils.checks import InputError
from diffusers_hprune.utils.fileio import copy_files
from diffusers_hprune.utils.untrusted import input_files, link_root, plain_name


@pytest.mark.parametrize("name", ["../.ssh", "..", ".", "", "/etc", "a/b", "a\\b", "x\0y", " text_encoder", 3, None])
def test_names_used_as_paths_must_be_plain(name):
    with pytest.raises(InputError, match="is not a plain name"):
        plain_name(name, "the component")


@pytest.mark.parametrize("name", ["text_encoder", "tokenizer_3", "vae", "..x", "a.b"])
def test_plain_names_pass(name):
    assert plain_name(name, "the component") == name


@pytest.fixture
def home(tmp_path):
    """A user's home with a secret beside a downloaded pipeline folder (``home/repo/pipe``, the SD3 toy)."""
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "authorized_keys").write_text("my key\n")
    (tmp_path / "token").write_text("hf_secret\n")
    shutil.copytree(toy.model_path("sd3"), tmp_path / "repo" / "pipe")
    return tmp_path


def _pruned(tmp_path, family="flux"):
    """A pruned pipeline folder (the tiny pipeline with the mixed plan; remote export by default)."""
    folder = tmp_path / f"pruned-{family}"
    prune_pipeline(tiny_pipeline(family), MIXED_PLANS[family]).save_pretrained(folder)
    return folder


def test_a_model_index_key_that_leaves_the_folder_is_refused_by_every_command(home, capsys):
    pipe = home / "repo" / "pipe"
    index = json.loads((pipe / "model_index.json").read_text())
    index["../../.ssh"] = ["diffusers", "AutoencoderKL"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    before = folder_state(home)
    for argv in (["quantize", pipe, "--out", home / "quant"], ["export", pipe, "--out", home / "export"],
                 ["evaluate", pipe, "--n", "1", "--no-cost"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "names a component '../../.ssh'" in err and "not a plain name" in err, err
    assert folder_state(home) == before  # nothing written, .ssh untouched


def test_a_link_out_of_the_input_is_never_copied_into_an_export_or_a_quantised_folder(home, tmp_path, capsys):
    source = _pruned(tmp_path)
    (source / "tokenizer" / "notes.txt").symlink_to(home / "token")
    before = folder_state(home)
    assert main(["export", str(source), "--out", str(home / "export")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt is a symbolic link to" in err and "outside the folder it is in" in err
    with pytest.raises(InputError, match="symbolic link"):
        copy_files(source / "tokenizer", home / "copy", root=source)
    assert folder_state(home) == before
    # a folder link out of the input is refused the same way
    (source / "tokenizer" / "notes.txt").unlink()
    (source / "tokenizer" / "more").symlink_to(home / ".ssh", target_is_directory=True)
    with pytest.raises(ExportError, match="more is a symbolic link"):
        export_folder(source, home / "export")
    assert not (home / "export").exists()


def test_links_inside_the_input_and_a_hub_cache_snapshot_are_followed(tmp_path):
    # a Hub cache: snapshots/REV/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snapshot = repo / "snapshots" / "0123"
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").symlink_to(os.path.relpath(repo / "blobs" / "abc", snapshot / "vae"))
    assert link_root(snapshot / "vae") == repo.resolve()
    assert [p.name for p in input_files(snapshot)] == ["config.json"]
    copy_files(snapshot / "vae", tmp_path / "copy", root=snapshot)
    assert (tmp_path / "copy" / "config.json").read_text() == "{}" and not (tmp_path / "copy" / "config.json").is_symlink()
    # a link inside an ordinary folder; a loop of folder links is walked once
    folder = tmp_path / "plain"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.json").write_text("1")
    (folder / "b.json").symlink_to(folder / "a" / "x.json")
    (folder / "a" / "loop").symlink_to(folder, target_is_directory=True)
    assert sorted(p.name for p in input_files(folder)) == ["b.json", "x.json"]


def test_an_export_carries_no_code_and_no_foreign_auto_map(tmp_path):
    source = _pruned(tmp_path)
    (source / "tokenizer" / "evil.py").write_text("import os\n")
    (source / "transformer" / "hprune_transformer_extra.py").write_text("import os\n")
    (source / "run.sh").write_text("rm -rf ~\n")
    config = json.loads((source / "text_encoder" / "config.json").read_text())
    (source / "text_encoder" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.M"}}))
    out = export_folder(source, tmp_path / "export", format="remote")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".py")] == ["transformer/hprune_transformer.py"]
    assert "run.sh" not in files
    assert "auto_map" not in json.loads((out / "text_encoder" / "config.json").read_text())
    assert json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"] == config["hidden_size"]
    assert check_export(out) == out


@pytest.mark.parametrize("fmt", ["stock", "remote"])
def test_an_export_drops_the_transformers_foreign_auto_map(tmp_path, fmt):
    """The transformer's config is rewritten by the export: an ``auto_map`` its author put there went along into a
    stock export."""
    source = tmp_path / "pruned"
    plan = PrunePlan(removed_blocks=[3], family="flux", num_blocks=MIXED_PLANS["flux"].num_blocks)
    prune_pipeline(tiny_pipeline("flux"), plan).save_pretrained(source)
    config = json.loads((source / "transformer" / "config.json").read_text())
    (source / "transformer" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.M"}}))
    out = export_folder(source, tmp_path / "export", format=fmt)
    written = json.loads((out / "transformer" / "config.json").read_text())
    assert written.get("auto_map") == ({"AutoModel": "hprune_transformer." + config["_class_name"]} if fmt == "remote"
                                       else None)
    assert check_export(out) == out


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_a_truncated_weights_file_is_named_not_copied(tmp_path, capsys, component):
    """Issue 32: `export --format remote` exited 0 on a truncated transformer file (copied as it was), and
    `quantize` copied a truncated text encoder."""
    source = _pruned(tmp_path)
    weights = next((source / component).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (["export", source, "--format", "remote", "--out", tmp_path / "x"],
                 ["quantize", source, "--out", tmp_path / "q"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert f"{weights} is damaged" in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "q").exists()


def test_push_refuses_an_export_that_holds_what_an_export_never_writes(tmp_path):
    source = _pruned(tmp_path)
    out = export_folder(source, tmp_path / "export", format="remote")
    (out / "vae" / "helper.py").write_text("import os\n")
    with pytest.raises(ExportError, match=r"vae/helper.py"), exported(out):
        pass
    (out / "vae" / "helper.py").unlink()
    (out / "transformer" / "hprune_transformer.py").write_text("import os\n")
    with pytest.raises(ExportError, match="is not the modeling code this version"), exported(out):
        pass


@pytest.mark.parametrize("edit,phrase", [
    (lambda i: i.update(_class_name="FluxPipeline"), "the pipeline class FluxPipeline is not for its sd3 transformer"),
    (lambda i: i.pop("_class_name"), "has no pipeline class (_class_name)"),
    (lambda i: i.update(vae=["diffusers"]), "the component 'vae' must be [library, class]"),
    (lambda i: i.update(vae="AutoencoderKL"), "the component 'vae' must be [library, class]"),
    (lambda i: i.update(vae=[None, "AutoencoderKL"]), "the component 'vae' must be [library, class]"),
    (lambda i: i.update(extra=["diffusers", "AutoencoderKL"]), "names the component 'extra', but"),
])
def test_a_mislabelled_or_broken_model_index_is_refused_before_any_work(home, capsys, edit, phrase):
    """Issue 32: quantize and export accepted a FLUX pipeline class around SD3 parts, or a missing vae/; evaluate
    raised Diffusers' tracebacks on malformed indexes."""
    pipe = home / "repo" / "pipe"
    index = json.loads((pipe / "model_index.json").read_text())
    edit(index)
    (pipe / "model_index.json").write_text(json.dumps(index))
    before = folder_state(home)
    for argv in (["quantize", pipe, "--out", home / "quant"], ["export", pipe, "--out", home / "export"],
                 ["evaluate", pipe, "--n", "1", "--no-cost"]):
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err, err
    assert folder_state(home) == before


def test_a_missing_component_folder_and_invalid_json_are_named(home, capsys):
    pipe = home / "repo" / "pipe"
    shutil.rmtree(pipe / "vae")
    for argv in (["quantize", pipe, "--out", home / "quant"], ["export", pipe, "--out", home / "export"],
                 ["evaluate", pipe, "--n", "1", "--no-cost"]):
        assert main([str(a) for a in argv]) == 2
        assert "names the component 'vae', but" in capsys.readouterr().err
    (pipe / "model_index.json").write_text("{not json")
    assert main(["evaluate", str(pipe), "--n", "1", "--no-cost"]) == 2
    assert "model_index.json is not valid JSON" in capsys.readouterr().err


def test_inspect_names_the_folder_given_its_quantisation_and_a_stock_exports_original_blocks(tmp_path, capsys):
    """Issue 32: `hprune inspect` headed a quantised folder with another folder's name (_name_or_path), gave bf16
    sizes for NF4, and called a stock export's kept blocks the original model."""
    plan = PrunePlan(removed_blocks=[1, 3], family="sd3", num_blocks=4)
    source = tmp_path / "pruned"
    prune_pipeline(tiny_pipeline("sd3"), plan).save_pretrained(source)
    stock = export_folder(source, tmp_path / "stock", format="stock")
    assert main(["inspect", str(stock)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{stock}:") and "4 blocks" in out
    assert [line.split()[3] for line in out.splitlines() if line[:1].isdigit()] == ["kept", "removed", "kept",
                                                                                    "removed"]
    nf4 = quantize_pipeline(toy.model_path("sd3"), tmp_path / "nf4")
    assert main(["inspect", str(nf4)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{nf4}:") and "MB@nf4" in out and "MB@bf16" not in out
