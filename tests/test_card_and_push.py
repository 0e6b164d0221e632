"""Model cards (huggingface_hub.ModelCard) and `hprune push` with HfApi replaced at its boundary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fill_hf_cache, folder_state, tiny_pipeline

from diffusers_hprune import PrunePlan, prune_pipeline, toy
from diffusers_hprune.cli import main
from diffusers_hprune.hub import CardError, export_folder, write_model_card


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A pruned toy pipeline with an evaluation, a grid, training leftovers, and its card."""
    base = tmp_path_factory.mktemp("push")
    folder = base / "sd3-pruned"
    plan = PrunePlan(removed_blocks=[10], removed_components={8: ["ff_context"]}, family="sd3", num_blocks=12)
    prune_pipeline(toy.load_pipeline("sd3"), plan).save_pretrained(folder)
    metrics, grid = base / "metrics.json", base / "grid.png"
    assert main(["evaluate", "sd3", str(folder), "--n", "3", "--latency-repeats", "2", "--warmup", "0",
                 "--out", str(metrics), "--grid", str(grid)]) == 0
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (folder / "data-cache").mkdir()
    (folder / "data-cache" / "a.arrow").write_bytes(b"x")
    write_model_card(folder, base_model="stabilityai/stable-diffusion-3.5-large-turbo", evaluation=metrics,
                     grid=grid, repo_id="someone/sd3-pruned", license="other",
                     commands=["hprune analyze ...", "hprune plan ..."])
    return folder, plan, json.loads(metrics.read_text())


def test_card_metadata_and_images(published):
    from huggingface_hub import ModelCard

    folder, plan, metrics = published
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "stabilityai/stable-diffusion-3.5-large-turbo"
    assert data["base_model_relation"] == "finetune" and data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image" and data["license"] == "other"
    assert {"hierarchicalprune", "pruned"} <= set(data["tags"]) and "4-bit" not in data["tags"]
    text = card.text
    assert plan.describe() in text and "| 10 | the whole block |" in text and "| 8 | ff_context |" in text
    shapeeval = metrics["models"]["student"]["metrics"]["shapeeval"]["overall"]
    assert f"{shapeeval:.4g}" in text and "someone/sd3-pruned" in text
    # Components were removed inside a block: the card shows the remote-code loading that `push` uploads for,
    # which works with Diffusers alone, and an install line that is true (the package is not on PyPI).
    assert 'DiffusionPipeline.from_pretrained("someone/sd3-pruned", trust_remote_code=True' in text
    assert "pip install diffusers-hprune" not in text and "not on PyPI" in text and "pypi.org" not in text
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (folder / image).is_file(), image
    with pytest.raises(CardError, match="teacher and a student"):
        write_model_card(folder, base_model="x/y", evaluation={"models": {"model": {}}})


def test_nf4_card_says_quantized(tmp_path):
    from huggingface_hub import ModelCard

    from diffusers_hprune.quantization import quantize_pipeline

    out = quantize_pipeline(toy.model_path("flux"), tmp_path / "flux-nf4")
    card = ModelCard.load(write_model_card(out, base_model="black-forest-labs/FLUX.1-schnell", license="apache-2.0"))
    assert card.data.base_model_relation == "quantized" and "4-bit" in card.data.tags
    assert "Not measured" in card.text


def test_local_base_model_is_named_not_linked(tmp_path):
    """A base model that is a local folder or a toy is not a Hub id: no base_model metadata, no link."""
    from huggingface_hub import ModelCard

    from diffusers_hprune.quantization import quantize_pipeline

    out = quantize_pipeline(toy.model_path("sd3"), tmp_path / "sd3-nf4")
    card = ModelCard.load(write_model_card(out, base_model="the toy SD3 pipeline", model_name="toy-sd3-hprune"))
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert card.text.lstrip().startswith("# toy-sd3-hprune")
    assert "A compressed version of the toy SD3 pipeline, made with" in card.text


class FakeApi:
    """HfApi at its boundary: records the calls and keeps a copy of what was uploaded."""

    def __init__(self, staged):
        self.calls = []
        self.staged = staged

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]):
            (self.staged / name).parent.mkdir(parents=True, exist_ok=True)
            (self.staged / name).write_bytes((root / name).read_bytes())
        return type("Commit", (), {"commit_url": "https://huggingface.co/someone/sd3-pruned/commit/abc"})()


def test_push_uploads_the_export_in_one_commit(published, monkeypatch, tmp_path, capsys):
    import diffusers_hprune.hub as hub

    folder, plan, _ = published
    before = folder_state(folder)
    api = FakeApi(tmp_path / "staged")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    assert main(["push", str(folder), "--repo-id", "someone/sd3-pruned", "--private", "--token", "hf_x"]) == 0
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/sd3-pruned", "repo_type": "model", "private": True,
                               "exist_ok": True}
    upload = api.calls[1][1]
    assert upload["repo_id"] == "someone/sd3-pruned" and hub.IGNORE_PATTERNS == upload["ignore_patterns"]
    assert Path(upload["folder_path"]).parent.parent == folder.parent  # exported beside the folder ...
    assert not Path(upload["folder_path"]).exists()  # ... and removed after the upload
    assert folder_state(folder) == before  # the folder itself is not touched
    tree = sorted(p.relative_to(api.staged).as_posix() for p in api.staged.rglob("*") if p.is_file())
    assert {"model_index.json", "README.md", "samples.png", "transformer/config.json",
            "transformer/hprune_transformer.py"} <= set(tree)
    assert not [f for f in tree if f.startswith(("checkpoint-", "data-cache"))]
    assert f"uploaded {len(tree)} files" in capsys.readouterr().out
    # What went up, laid out as a Hub download in an offline cache, loads by repo id in a process that
    # cannot import diffusers_hprune, with trust_remote_code as the card says.
    fill_hf_cache(api.staged, "someone/sd3-pruned", tmp_path / "cache")
    code = (
        "import sys\n"
        "sys.modules['diffusers_hprune'] = None\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained('someone/sd3-pruned', cache_dir={str(tmp_path / 'cache')!r}, "
        "trust_remote_code=True)\n"
        "print(type(pipe).__name__, type(pipe.transformer).__name__, pipe.transformer.prune_plan.describe())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["StableDiffusion3Pipeline", "HierarchicalPrunedSD3Transformer2DModel"]
    assert plan.describe() in result.stdout


def test_push_with_base_model_writes_the_card_into_the_export_only(published, monkeypatch, tmp_path):
    folder, _, _ = published
    before = folder_state(folder)
    api = FakeApi(tmp_path / "staged")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    assert main(["push", str(folder), "--repo-id", "someone/other", "--token", "hf_x",
                 "--base-model", "stabilityai/stable-diffusion-3.5-medium"]) == 0
    assert folder_state(folder) == before
    card = (api.staged / "README.md").read_text()
    assert "stabilityai/stable-diffusion-3.5-medium" in card and 'from_pretrained("someone/other"' in card


def test_push_refuses_without_credentials_or_a_pipeline(published, monkeypatch, tmp_path, capsys):
    folder, _, _ = published
    api = FakeApi(tmp_path / "staged")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: api)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(folder), "--repo-id", "someone/x"]) == 2
    assert "No Hugging Face token" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo-id", "someone/x", "--token", "hf_x"]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err
    before = folder_state(folder)
    for bad in ("no-slash", "me/bad name!", "a/b/c"):
        assert main(["push", str(folder), "--repo-id", bad, "--token", "hf_x", "--base-model", "x/y"]) == 2
        assert "ORG/NAME" in capsys.readouterr().err
    assert api.calls == [] and folder_state(folder) == before  # nothing was written, created or uploaded


@pytest.mark.parametrize("failure", [ConnectionError("[Errno 101] Network is unreachable"),
                                     OSError("Cannot reach https://huggingface.co: offline mode is enabled")])
def test_push_that_cannot_reach_the_hub_says_so(published, monkeypatch, tmp_path, capsys, failure):
    folder, _, _ = published
    before = folder_state(folder)

    class Unreachable(FakeApi):
        def create_repo(self, **kwargs):
            raise failure

    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: Unreachable(tmp_path / "staged"))
    assert main(["push", str(folder), "--repo-id", "someone/sd3-pruned", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert "Publishing to https://huggingface.co/someone/sd3-pruned failed" in err and "network connection" in err
    assert "Traceback" not in err and folder_state(folder) == before
    assert not [p for p in folder.parent.iterdir() if ".push-" in p.name]  # the temporary export is gone


def test_the_card_says_how_the_distillation_ran(tmp_path):
    """The precision actually used (the flag, else the launch config's) and the processes, from distill_summary.json."""
    import json

    from diffusers_hprune import PrunePlan, prune_pipeline, toy
    from diffusers_hprune.hub.card import render_model_card

    folder = tmp_path / "distilled"
    prune_pipeline(toy.load_pipeline("sd3"), PrunePlan(family="sd3", num_blocks=12, removed_blocks=[10])) \
        .save_pretrained(folder)
    (folder / "distill_summary.json").write_text(json.dumps({
        "steps": 2000, "mixed_precision": "bf16", "teacher_dtype": "nf4", "frozen_dtype": "bfloat16",
        "trainable_dtype": "float32", "processes": 8, "distributed": "MULTI_GPU"}))
    card = str(render_model_card(folder, base_model="the toy", commands=["hprune distill ..."]))
    made = card[card.index("## How it was made"):]
    assert ("Distillation: 2000 steps, mixed precision bf16 (teacher nf4, frozen parts bfloat16, trained weights "
            "float32), 8 processes (MULTI_GPU).") in made


def _run_card_snippet(folder: Path) -> subprocess.CompletedProcess:
    """The first Python block of ``folder/README.md``, run as it is in a fresh process (from another folder)."""
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    return subprocess.run([sys.executable, "-c", code + "\nprint('SNIPPET OK', image.size)\n"], capture_output=True,
                          text=True, timeout=600, cwd=folder.parent.parent,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})


@pytest.mark.parametrize("plan", [
    PrunePlan(removed_blocks=[1], family="sd3", num_blocks=4),  # stock export
    PrunePlan(removed_blocks=[1], removed_components={2: ["ff_context"]}, family="sd3", num_blocks=4),  # remote
])
def test_every_cards_loading_snippet_runs_for_the_folder_it_is_written_into(plan, tmp_path):
    """Issue 32: the card of a local folder (a compress output) showed the Hub snippet (trust_remote_code, AutoModel),
    which fails for the folder it sits in, and an export's card named the source folder, failing beside the export."""
    folder = tmp_path / "runs" / "pruned"
    prune_pipeline(tiny_pipeline("sd3"), plan).save_pretrained(folder)
    write_model_card(folder, base_model="stabilityai/stable-diffusion-3.5-large")
    card = (folder / "README.md").read_text()
    assert "import diffusers_hprune" in card and f'from_pretrained("{folder}"' in card
    result = _run_card_snippet(folder)
    assert "SNIPPET OK" in result.stdout, result.stderr[-3000:]
    export = export_folder(folder, tmp_path / "runs" / "export")
    card = (export / "README.md").read_text()
    assert f'from_pretrained("{export}"' in card and str(folder) not in card.split("## How to use")[1]
    assert "import diffusers_hprune" not in card
    result = _run_card_snippet(export)
    assert "SNIPPET OK" in result.stdout, result.stderr[-3000:]
    named = export_folder(folder, tmp_path / "runs" / "named", repo_id="someone/pruned")
    assert 'from_pretrained("someone/pruned"' in (named / "README.md").read_text()
