"""Outputs written atomically keep the user's umask, and --overwrite leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from diffusers_hprune.utils.fileio import atomic_directory, atomic_path, atomic_write_json


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_outputs_get_the_mode_plain_open_and_mkdir_give(tmp_path, umask):
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    with atomic_path(tmp_path / "b.png") as tmp:
        tmp.write_bytes(b"png")
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "inside.json").write_text("{}")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.png") == _mode(plain_file) == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == _mode(plain_dir) == 0o777 & ~umask
    if umask == 0o022:
        assert _mode(tmp_path / "a.json") == 0o644 and _mode(tmp_path / "folder") == 0o755


@pytest.mark.parametrize("what", ["folder", "file", "link"])
def test_overwrite_leaves_no_old_copy(tmp_path, what):
    target = tmp_path / "out"
    if what == "folder":
        target.mkdir()
        (target / "old.txt").write_text("old")
    elif what == "file":
        target.write_text("a file where the folder goes")
    else:
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "kept.txt").write_text("not ours to delete")
        target.symlink_to(tmp_path / "elsewhere")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["elsewhere"] if what == "link" else []))
    if what == "link":  # the link was replaced, not what it pointed to
        assert (tmp_path / "elsewhere" / "kept.txt").read_text() == "not ours to delete"


def _modes(folder):
    return {str(p.relative_to(folder)): _mode(p) for p in sorted(folder.rglob("*"))}


def test_saved_weights_get_the_users_mode_not_safetensors_0600(tmp_path, umask, sd3_pipeline):
    """safetensors 0.8 writes 0600 whatever the umask: every weight file the project writes is readable as umask allows."""
    from diffusers_hprune import PrunePlan, prune_pipeline
    from diffusers_hprune.hub.export import export_folder
    from diffusers_hprune.quantization.folder import quantize_pipeline

    plan = PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4)
    prune_pipeline(sd3_pipeline, plan).save_pretrained(tmp_path / "pruned")
    quantize_pipeline(tmp_path / "pruned", tmp_path / "nf4")
    export_folder(tmp_path / "pruned", tmp_path / "stock", format="stock")
    for folder in ("pruned", "nf4", "stock"):
        modes = _modes(tmp_path / folder)
        weights = {k: m for k, m in modes.items() if k.endswith(".safetensors")}
        assert {k for k in weights if k.startswith("transformer/")} and len(weights) >= 4  # transformer, encoders, VAE
        assert set(weights.values()) == {0o666 & ~umask}, (folder, weights)
        assert {m for k, m in modes.items() if (tmp_path / folder / k).is_dir()} == {0o777 & ~umask}


def test_a_file_given_another_mode_is_left_alone(tmp_path):
    from diffusers_hprune.utils.fileio import safetensors_user_modes

    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"x")
    os.chmod(mine, 0o640)
    safetensors_user_modes(tmp_path)
    assert _mode(mine) == 0o640
