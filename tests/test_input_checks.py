"""Issue 18: every value, file and path a user gives is checked where it enters, before any work,
with a message naming the problem and the fix; nothing that existed is changed by a refusal."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from helpers import folder_state

from diffusers_hprune import PlanError, PrunePlan, toy
from diffusers_hprune.analysis import synthetic_report
from diffusers_hprune.cli import main
from diffusers_hprune.compression.config import ConfigError, HPruneConfig
from diffusers_hprune.contributions import AnalysisError, ContributionReport
from diffusers_hprune.distillation.data import DataError, read_prompts
from diffusers_hprune.utils.checks import MAX_PROMPT_CHARS, MAX_TEXT_BYTES

NOT_UTF8 = b'{"family": "sd3", "note": "caf\xe9"}'


def _refused(argv, capsys, phrase, *, argparse_error=False) -> str:
    """Run ``hprune ARGV``; it must exit with 2 and say ``phrase`` on stderr. Returns stderr."""
    if argparse_error:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        code = exc.value.code
    else:
        code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert phrase in err, err
    return err


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """A synthetic analysis of the toy SD3 transformer (12 blocks), as JSON data."""
    return synthetic_report(toy.model_path("sd3")).to_dict()


@pytest.fixture
def work(tmp_path):
    """A folder holding one file, to show a refusal leaves it byte-identical."""
    (tmp_path / "keep.txt").write_text("keep")
    return tmp_path


# -- 1. plan files ------------------------------------------------------------------------------
@pytest.mark.parametrize("change,phrase", [
    ({"removed_blocks": "12"}, "`removed_blocks` must be a list of block indices"),
    ({"removed_blocks": [True]}, "Block index True in `removed_blocks` is not an integer (a boolean)"),
    ({"removed_blocks": ["1"]}, "write the number without quotes"),
    ({"removed_blocks": [2.0]}, "Block index 2.0 in `removed_blocks` is not an integer"),
    ({"removed_blocks": None}, "`removed_blocks` must be a list of block indices (e.g. [3, 7]), got null"),
    ({"removed_components": {"2": 5}}, "`removed_components` of block 2 must be a list of component names"),
    ({"removed_components": {"2": [5]}}, "must be a list of component names"),
    ({"removed_components": {"two": ["ff"]}}, "Block index 'two' in `removed_components` is not an integer"),
    ({"removed_components": None}, "`removed_components` must map block indices to lists of component names"),
    ({"removed_components": {"3": ["ff"], "03": ["attn"]}}, "`removed_components` names block 3 twice ('3' and '03')"),
    ({"num_blocks": 10**9}, "`num_blocks` must be a positive integer (at most 10,000)"),
    ({"num_blocks": "12"}, "`num_blocks` must be a positive integer"),
    ({"family": ["sd3"]}, "Unknown model family ['sd3']"),
    ({"metadata": [1]}, "`metadata` must be a dict"),
    ({"version": "1"}, "`version` must be a positive integer"),
])
def test_plan_file_types(work, capsys, change, phrase):
    plan = work / "plan.json"
    plan.write_text(json.dumps(PrunePlan(removed_blocks=[3], family="sd3", num_blocks=12).to_dict() | change))
    before = folder_state(work)
    with pytest.raises(PlanError):
        PrunePlan.load(plan)
    _refused(["budget", "sd3", "--plan", plan], capsys, phrase)
    assert folder_state(work) == before


def test_plan_single_component_name_and_string_keys_still_load():
    plan = PrunePlan.from_dict({"family": "sd3", "num_blocks": 12, "removed_components": {"2": "ff", 3: ["attn"]}})
    assert plan.removed_components == {2: ["ff"], 3: ["attn"]}


def test_a_key_given_twice_in_a_plan_file_is_refused(work, capsys):
    """JSON keeps the last of two equal keys: the first list of components would be lost without a word."""
    text = '{"format": "diffusers-hprune/plan", "family": "sd3", "num_blocks": 12, "removed_blocks": [], ' \
           '"removed_components": {"3": ["ff"], "3": ["attn"]}}'
    (work / "plan.json").write_text(text)
    before = folder_state(work)
    _refused(["budget", "sd3", "--plan", work / "plan.json"], capsys, "has the key '3' twice in one object")
    assert folder_state(work) == before


def test_plan_file_not_utf8(work, capsys):
    (work / "plan.json").write_bytes(NOT_UTF8)
    before = folder_state(work)
    _refused(["budget", "sd3", "--plan", work / "plan.json"], capsys, "is not UTF-8 text")
    with pytest.raises(PlanError, match="save it as UTF-8"):
        PrunePlan.load(work / "plan.json")
    assert folder_state(work) == before


# -- prompt and text files ----------------------------------------------------------------------
def test_a_prompt_holding_a_form_feed_or_a_line_separator_is_one_prompt(work):
    (work / "p.txt").write_text("a red circle\fabove a blue square\r\nthree green\u2028triangles\n\n  \n")
    assert read_prompts(str(work / "p.txt")) == ["a red circle\fabove a blue square", "three green\u2028triangles"]


def test_text_files_are_bounded_before_they_are_read(work, capsys):
    huge = work / "huge.txt"
    with huge.open("wb") as f:  # sparse: 65 MiB that take no disk
        f.truncate(MAX_TEXT_BYTES + 1)
    with pytest.raises(DataError, match="more than the 67,108,864 a command reads"):
        read_prompts(str(huge))
    with pytest.raises(DataError, match="is not a regular file"):
        read_prompts("/dev/zero")
    (work / "long.txt").write_text("ok\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n")
    with pytest.raises(DataError, match="Line 2 of .* has 10,001 characters"):
        read_prompts(str(work / "long.txt"))
    before = folder_state(work)
    _refused(["plan", huge, "--ratio", "0.2", "--out", work / "plan.json"], capsys, "more than the 67,108,864")
    _refused(["plan", "/dev/zero", "--ratio", "0.2", "--out", work / "plan.json"], capsys, "not a regular file")
    assert folder_state(work) == before


# -- 2. analysis files --------------------------------------------------------------------------
def _layers(data, n):
    data["transformer_config"]["num_layers"] = n


@pytest.mark.parametrize("edit,phrase", [
    (lambda d: _layers(d, 1e9), "transformer_config.num_layers must be an integer"),
    (lambda d: _layers(d, 10**9), "transformer_config.num_layers must be at most 10000"),
    (lambda d: d.update(num_blocks=10**12), "num_blocks must be at most 10000"),
    (lambda d: d.update(pairs="false"), "`pairs` must be true or false"),
    (lambda d: d.update(entries={}), "`entries` must be a list"),
    (lambda d: d["entries"][0].update(block="0"), "entry 0 block must be an integer"),
    (lambda d: d["entries"][1].update(delta="big"), "delta must be a number"),
    (lambda d: d["entries"][1].update(delta=math.inf), "must be a finite number"),
    (lambda d: d["entries"].append({"block": 99, "component": "attn", "score": 0.0, "delta": 0.0}),
     "1 entry for parts the sd3 model it describes (12 blocks, indices 0..11) does not have: block 99 attn"),
    (lambda d: d["entries"].__setitem__(1, dict(d["entries"][1], component="wings")), "block 0 wings"),
    (lambda d: d.update(similarity=[{"block": i, "cosine": math.nan} for i in range(12)]),
     "similarity entry 0 cosine must be a finite number"),
    (lambda d: d.update(similarity=[{"block": 0, "cosine": 3.0}]), "similarity entry 0 cosine must be at most 1.001"),
])
def test_analysis_file_types_and_bounds(analysis, work, capsys, edit, phrase):
    data = json.loads(json.dumps(analysis))
    edit(data)
    (work / "a.json").write_text(json.dumps(data))
    before = folder_state(work)
    _refused(["plan", work / "a.json", "--ratio", "0.3", "--out", work / "p.json"], capsys, phrase)
    assert folder_state(work) == before


def test_analysis_file_not_utf8(work, capsys):
    (work / "a.json").write_bytes(NOT_UTF8)
    before = folder_state(work)
    _refused(["plan", work / "a.json", "--ratio", "0.3", "--out", work / "p.json"], capsys, "is not UTF-8 text")
    with pytest.raises(AnalysisError, match="save it as UTF-8"):
        ContributionReport.load(work / "a.json")
    assert folder_state(work) == before


def test_incomplete_analysis_names_what_is_missing(analysis, work, capsys):
    data = json.loads(json.dumps(analysis))
    data["entries"] = [e for e in data["entries"] if (e["block"], e["component"]) != (3, "ff")]
    (work / "a.json").write_text(json.dumps(data))
    before = folder_state(work)
    _refused(["plan", work / "a.json", "--ratio", "0.3", "--out", work / "p.json"], capsys,
             "incomplete (70 of 71 entries; it lacks block 3 ff)")
    assert folder_state(work) == before


# -- 3. numbers, 4. booleans --------------------------------------------------------------------
ANALYSIS = "ANALYSIS"  # replaced by a real analysis file
NUMBER_REFUSALS = [
    (["analyze", "sd3", "--out", "{w}/a.json", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--eval-steps", "0"], "argument --eval-steps: must be at least 1"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--n-prompts", "0"], "argument --n-prompts: must be at least 1"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--height", "0"], "argument --height: must be at least 1"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--width", "-16"], "argument --width: must be at least 1"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--seed", "-1"], "argument --seed: must be 0 or more"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--guidance-scale", "nan"], "argument --guidance-scale: 'nan' is not"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--guidance-scale", "-1"], "argument --guidance-scale: must be 0 or"),
    (["analyze", "sd3", "--out", "{w}/a.json", "--max-cache-bytes", "0"], "give a positive size"),
    (["evaluate", "sd3", "--steps", "0"], "argument --steps: must be at least 1"),
    (["evaluate", "sd3", "--n", "0"], "argument --n: must be at least 1"),
    (["evaluate", "sd3", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["evaluate", "sd3", "--latency-repeats", "0"], "argument --latency-repeats: must be at least 1"),
    (["evaluate", "sd3", "--warmup", "-1"], "argument --warmup: must be 0 or more"),
    (["evaluate", "sd3", "--grid-size", "0"], "argument --grid-size: must be at least 1"),
    (["evaluate", "sd3", "--guidance-scale", "inf"], "argument --guidance-scale: 'inf' is not a finite"),
    (["evaluate", "sd3", "--seed", "-3"], "argument --seed: must be 0 or more"),
    (["plan", ANALYSIS, "--ratio", "nan", "--out", "{w}/p.json"], "argument --ratio: 'nan' is not a finite"),
    (["plan", ANALYSIS, "--ratio", "0.3", "--alpha", "inf", "--out", "{w}/p.json"], "argument --alpha: 'inf'"),
    (["plan", ANALYSIS, "--ratio", "0.3", "--r-thres", "2", "--out", "{w}/p.json"],
     "argument --r-thres: must be between 0 and 1"),
    (["plan", ANALYSIS, "--memory", "0", "--out", "{w}/p.json"], "argument --memory: '0' is no bytes"),
    (["report", ANALYSIS, "--alpha", "nan", "--out", "{w}/r"], "argument --alpha: 'nan' is not a finite"),
    (["budget", "sd3", "--ratio", "0"], "argument --ratio: must lie strictly between 0 and 1"),
    (["budget", "sd3", "--resolution", "0"], "argument --resolution: must be at least 1"),
    (["budget", "sd3", "--num-processes", "0"], "argument --num-processes: must be at least 1"),
    (["budget", "sd3", "--train-batch-size", "0"], "argument --train-batch-size: must be at least 1"),
    (["budget", "sd3", "--lora-rank", "-1"], "argument --lora-rank: must be 0 or more"),
    (["budget", "sd3", "--train-samples", "0"], "argument --train-samples: must be at least 1"),
    (["budget", "sd3", "--eval-steps", "0"], "argument --eval-steps: must be at least 1"),
    (["compress", "sd3", "--out", "{w}/c", "--ratio", "1"], "argument --ratio: must lie strictly between 0 and 1"),
    (["compress", "sd3", "--out", "{w}/c", "--memory", "0"], "argument --memory: '0' is no bytes"),
    (["compress", "sd3", "--out", "{w}/c", "--pwp", "flase"], "argument --pwp: 'flase' is not a boolean"),
    (["compress", "sd3", "--out", "{w}/c", "--sgdistill", "maybe"], "argument --sgdistill: 'maybe' is not a boolean"),
    (["compress", "sd3", "--out", "{w}/c", "--vae-tiling", "maybe"], "argument --vae-tiling: 'maybe' is not a boolean"),
    (["compress", "sd3", "--out", "{w}/c", "--eval-batch-size", "0"], "argument --eval-batch-size: must be at least 1"),
    (["budget", "sd3", "--eval-batch-size", "0"], "argument --eval-batch-size: must be at least 1"),
    (["compress", "sd3", "--out", "{w}/c", "--learning-rate", "nan"], "argument --learning-rate: 'nan' is not a"),
    (["compress", "sd3", "--out", "{w}/c", "--learning-rate", "0"], "argument --learning-rate: must be a positive"),
    (["compress", "sd3", "--out", "{w}/c", "--max-train-steps", "0"], "argument --max-train-steps: must be at least 1"),
    (["compress", "sd3", "--out", "{w}/c", "--max-train-minutes", "0"], "argument --max-train-minutes: must be a"),
    (["compress", "sd3", "--out", "{w}/c", "--checkpointing-steps", "-1"], "argument --checkpointing-steps: must be 0"),
    (["compress", "sd3", "--out", "{w}/c", "--lora-rank", "-1"], "argument --lora-rank: must be 0 or more"),
    (["compress", "sd3", "--out", "{w}/c", "--alpha", "inf"], "argument --alpha: 'inf' is not a finite"),
    (["compress", "sd3", "--out", "{w}/c", "--r-thres", "-0.1"], "argument --r-thres: must be between 0 and 1"),
    (["compress", "sd3", "--out", "{w}/c", "--seed", "-1"], "argument --seed: must be 0 or more"),
    (["demo", "--out", "{w}/d", "--ratio", "2"], "argument --ratio: must lie strictly between 0 and 1"),
    (["demo", "--out", "{w}/d", "--eval-prompts", "0"], "argument --eval-prompts: must be at least 1"),
    (["demo", "--out", "{w}/d", "--quantize", "nf4", "--pwp", "nope"], "argument --pwp: 'nope' is not a boolean"),
    (["toy-train", "--out", "{w}/t", "--minutes", "0"], "argument --minutes: must be a positive"),
    (["toy-train", "--out", "{w}/t", "--seed", "-1"], "argument --seed: must be 0 or more"),
    (["toy-train", "--out", "{w}/t", "--toys", "sd4"], "argument --toys: invalid choice: 'sd4'"),
]


@pytest.mark.parametrize("argv,phrase", NUMBER_REFUSALS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in NUMBER_REFUSALS])
def test_numbers_and_booleans_are_argparse_errors(analysis, work, capsys, argv, phrase):
    (work / "a.json").write_text(json.dumps(analysis))
    before = folder_state(work)
    argv = [str(work / "a.json") if a == ANALYSIS else a.format(w=work) for a in argv]
    _refused(argv, capsys, phrase, argparse_error=True)
    assert folder_state(work) == before


@pytest.mark.parametrize("command", [["analyze", "sd3", "--out", "{w}/a.json"], ["evaluate", "sd3"]])
@pytest.mark.parametrize("size", [["--height", "7"], ["--width", "30"]])
def test_image_sizes_must_fit_the_model(work, capsys, command, size):
    before = folder_state(work)
    err = _refused([a.format(w=work) for a in command] + size, capsys, f"The image {size[0][2:]} {size[1]} is not a "
                   "multiple of 4, which sd3 needs")
    assert "use e.g. " in err
    assert folder_state(work) == before


def test_generation_settings_check_the_pipeline():
    from diffusers_hprune.loading import generation_settings, load_pipeline, pixel_multiple
    from diffusers_hprune.utils.checks import InputError

    pipe, _ = load_pipeline("sd3", None, None)
    assert pixel_multiple(pipe) == pixel_multiple("sd3") == 4
    assert generation_settings(pipe, 2, 16, 24, 0)["width"] == 24
    for kwargs, phrase in [({"num_inference_steps": 0}, "denoising steps must be at least 1"),
                           ({"height": 18}, "height 18 is not a multiple of 4"),
                           ({"guidance_scale": math.nan}, "guidance scale must be a finite number"),
                           ({"guidance_scale": -2.0}, "guidance scale must be at least 0")]:
        with pytest.raises(InputError, match=phrase):
            generation_settings(pipe, **kwargs)


@pytest.mark.parametrize("kwargs,phrase", [
    ({"learning_rate": math.nan}, "learning_rate must be a finite number"),
    ({"learning_rate": 0}, "learning_rate must be above 0"),
    ({"pwp": "false"}, "pwp must be true or false, got 'false'"),
    ({"quantize": 1}, "quantize must be true or false"),
    ({"max_train_minutes": 0}, "max_train_minutes must be above 0"),
    ({"max_train_minutes": math.inf}, "max_train_minutes must be a finite number"),
    ({"checkpointing_steps": -1}, "checkpointing_steps must be at least 0"),
    ({"lora_rank": 2.5}, "lora_rank must be an integer"),
    ({"memory": 1.5e9, "ratio": None}, "memory must be a positive whole number of bytes"),
    ({"memory": True, "ratio": None}, "memory must be a positive whole number of bytes"),
    ({"alpha": math.nan}, "alpha must be a finite number"),
    ({"ratio": "0.3"}, "ratio must be a number"),
    ({"r_thres": math.nan}, "r_thres must be a finite number"),
    ({"seed": -1}, "seed must be at least 0"),
    ({"train_batch_size": True}, "train_batch_size must be an integer"),
    ({"metric": 3}, "metric must be a metric's name"),
    ({"mixed_precision": ["bf16"]}, "mixed_precision must be one of no, fp16, bf16"),
])
def test_config_values_are_checked(kwargs, phrase):
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(")):
        HPruneConfig(**kwargs)


def test_config_file_with_a_string_boolean(work, capsys):
    config = HPruneConfig().to_dict() | {"pwp": "false"}
    (work / "c.json").write_text(json.dumps(config))
    (work / "bad.json").write_bytes(NOT_UTF8)
    before = folder_state(work)
    _refused(["compress", "sd3", "--out", work / "run", "--config", work / "c.json"], capsys,
             "pwp must be true or false, got 'false'")
    _refused(["compress", "sd3", "--out", work / "run", "--config", work / "bad.json"], capsys, "is not UTF-8 text")
    assert folder_state(work) == before


# -- 5. output paths ----------------------------------------------------------------------------
OUTPUTS = [  # (argv, "file" or "folder": what the output must be)
    (["analyze", "sd3", "--out", "{out}"], "file"),
    (["analyze", "sd3-medium", "--synthetic", "--out", "{out}"], "file"),
    (["plan", ANALYSIS, "--ratio", "0.3", "--out", "{out}"], "file"),
    (["report", ANALYSIS, "--out", "{out}"], "folder"),
    (["evaluate", "sd3", "--out", "{out}"], "file"),
    (["evaluate", "sd3", "--grid", "{out}"], "file"),
    (["quantize", "{w}/model", "--out", "{out}"], "folder"),
    (["export", "{w}/model", "--out", "{out}"], "folder"),
    (["convert-lora", "{w}/lora.safetensors", "--to", "{w}/model", "--out", "{out}"], "file"),
    (["toy-train", "--out", "{out}"], "folder"),
    (["compress", "sd3", "--out", "{out}"], "folder"),
    (["demo", "--out", "{out}"], "folder"),
]
OUTPUT_IDS = [f"{a[0]} {a[2] if a[1] == 'sd3-medium' else ''}".strip() + f" {a[-2]}" for a, _ in OUTPUTS]


def _output_argv(argv, work, out):
    return [str(work / "a.json") if a == ANALYSIS else a.format(w=work, out=out) for a in argv]


@pytest.mark.parametrize("argv,kind", OUTPUTS, ids=OUTPUT_IDS)
def test_output_of_the_wrong_kind(analysis, work, capsys, argv, kind):
    (work / "a.json").write_text(json.dumps(analysis))
    wrong = work / "wrong"
    if kind == "file":
        wrong.mkdir()
        (wrong / "inside.txt").write_text("x")
    else:
        wrong.write_text("a file")
    before = folder_state(work)
    phrase = f"{wrong} is a folder; give a file name" if kind == "file" else f"{wrong} is a file; give a folder"
    _refused(_output_argv(argv, work, wrong), capsys, phrase)
    assert folder_state(work) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("argv,kind", OUTPUTS, ids=OUTPUT_IDS)
def test_output_in_a_read_only_folder(analysis, work, capsys, argv, kind):
    (work / "a.json").write_text(json.dumps(analysis))
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = folder_state(work)
        _refused(_output_argv(argv, work, locked / "new" / "out"), capsys, f"the folder {locked} is not writable")
        assert folder_state(work) == before
    finally:
        locked.chmod(0o755)


def test_outputs_inside_their_input_are_refused(work, capsys):
    model = work / "model"
    shutil.copytree(toy.model_path("sd3"), model)
    before = folder_state(work)
    _refused(["quantize", model, "--out", model / "nf4"], capsys, "is inside MODEL")
    _refused(["export", model, "--out", model], capsys, "is the same path as FOLDER")
    _refused(["compress", model, "--out", model / "run"], capsys, "is inside MODEL")
    assert folder_state(work) == before


def test_outputs_that_are_or_hold_an_input_are_refused_even_with_overwrite(work, capsys, analysis):
    """Issue 32: `--overwrite` with an --out that holds the input deleted the input; a plan written over its analysis,
    an evaluation over the model's index, the grid over the JSON."""
    model = work / "models" / "model"
    shutil.copytree(toy.model_path("sd3"), model)
    (work / "analysis.json").write_text(json.dumps(analysis))
    (work / "p.txt").write_text("a red circle\n")
    before = folder_state(work)
    _refused(["quantize", model, "--out", work / "models", "--overwrite"], capsys, "is a folder that holds MODEL")
    _refused(["quantize", model, "--out", work, "--overwrite"], capsys, "is a folder that holds MODEL")
    _refused(["export", model, "--out", work / "models", "--overwrite"], capsys, "is a folder that holds FOLDER")
    _refused(["compress", model, "--out", work / "models"], capsys, "is a folder that holds MODEL")
    _refused(["plan", work / "analysis.json", "--ratio", "0.2", "--out", work / "analysis.json"], capsys,
             "--out {} is the same path as ANALYSIS".format(work / "analysis.json"))
    _refused(["evaluate", model, "--out", model / "model_index.json", "--no-cost"], capsys, "is inside MODEL")
    _refused(["evaluate", model, "--out", work / "p.txt", "--prompts", work / "p.txt"], capsys,
             "is the same path as --prompts")
    _refused(["evaluate", model, "--out", work / "g.png", "--grid", work / "g.png"], capsys,
             "--out and --grid are the same file")
    _refused(["evaluate", model, "--grid", work / "grid"], capsys, "the file name must end in .png")
    _refused(["analyze", model, "--out", model / "a.json"], capsys, "is inside MODEL")
    assert folder_state(work) == before


def test_compress_checks_the_push_repo_id_first(work, capsys):
    before = folder_state(work)
    _refused(["compress", "sd3", "--out", work / "run", "--push", "noslash"], capsys, "--repo-id must be ORG/NAME")
    assert folder_state(work) == before


# -- 6. weights ---------------------------------------------------------------------------------
@pytest.fixture
def model(work):
    model = work / "model"
    shutil.copytree(toy.model_path("sd3"), model)
    return model


def test_truncated_weights_are_named(model, work, capsys):
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    before = folder_state(work)
    err = _refused(["quantize", model, "--out", work / "nf4"], capsys, f"{weights} is damaged")
    assert "Download it again" in err
    _refused(["evaluate", model, "--no-cost"], capsys, f"{weights} is damaged")
    assert folder_state(work) == before


def test_pickled_weights_are_refused(model, work, capsys):
    from safetensors.torch import load_file
    from torch import save

    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    before = folder_state(work)
    phrase = "diffusion_pytorch_model.bin: refused, not safetensors"
    _refused(["quantize", model, "--out", work / "nf4"], capsys, phrase)
    _refused(["evaluate", model, "--no-cost"], capsys, phrase)
    _refused(["export", model, "--out", work / "export"], capsys, phrase)
    from diffusers_hprune import HierarchicalPrunedSD3Transformer2DModel, HPruneError

    with pytest.raises(HPruneError, match=phrase):
        HierarchicalPrunedSD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    assert folder_state(work) == before


# -- 7. push ------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo_id,phrase", [("me/bad name!", "Repo id must use alphanumeric chars"),
                                            ("noslash", "it needs exactly one '/'."), ("a/b/c", "exactly one '/'")])
def test_push_refuses_a_bad_repo_id_before_writing(work, capsys, repo_id, phrase):
    folder = work / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    card = b"---\nlicense: other\n---\n# card\n"
    (folder / "README.md").write_bytes(card)
    before = folder_state(work)
    err = _refused(["push", folder, "--repo-id", repo_id, "--base-model", "stabilityai/x"], capsys,
                   "--repo-id must be ORG/NAME")
    assert phrase in err and "Nothing was written or uploaded" in err
    assert (folder / "README.md").read_bytes() == card
    assert folder_state(work) == before


def test_free_form_prompts_where_shapeeval_scores_are_refused_before_any_work(work, capsys):
    """Issue 32: `a photo of a cat` on a toy ended in a traceback after all the work (compress: after 6 minutes)."""
    (work / "free.txt").write_text("a red circle\na photo of a cat\n")
    before = folder_state(work)
    phrase = "Prompt 2 of {}, 'a photo of a cat', is not in the toy grammar".format(work / "free.txt")
    _refused(["evaluate", "sd3", "--prompts", work / "free.txt", "--no-cost"], capsys, phrase)
    _refused(["analyze", "sd3", "--metric", "shapeeval", "--prompts", work / "free.txt", "--out", work / "a.json"],
             capsys, phrase)
    _refused(["compress", "sd3", "--eval-prompts-file", work / "free.txt", "--out", work / "run"], capsys,
             "'a photo of a cat', is not in the toy grammar")
    assert folder_state(work) == before


@pytest.mark.parametrize("value,phrase", [
    (10**8, "num_layers must be an integer from 1 to 1,000, got 100000000"),
    (12.5, "num_layers must be an integer from 1 to 1,000, got 12.5"),
    (-5, "num_layers must be an integer from 1 to 1,000, got -5"),
    (True, "got True"),
])
def test_transformer_config_sizes_are_bounded_before_anything_is_built(work, capsys, value, phrase):
    """Issue 32: num_layers 1e8 grew `inspect` past 3.9 GB and made `analyze` allocate 256 GB; 12.5 was a TypeError."""
    model = work / "model"
    shutil.copytree(toy.model_path("sd3"), model)
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": value}))
    before = folder_state(work)
    _refused(["inspect", model], capsys, phrase)
    _refused(["analyze", model, "--out", work / "a.json", "--n-prompts", "1"], capsys, phrase)
    _refused(["quantize", model, "--out", work / "q"], capsys, phrase)
    assert folder_state(work) == before


def test_a_transformer_wider_than_the_bound_is_refused(work, capsys):
    model = work / "model"
    shutil.copytree(toy.model_path("sd3"), model)
    config = json.loads((model / "transformer" / "config.json").read_text())
    (model / "transformer" / "config.json").write_text(json.dumps({**config, "num_attention_heads": 1024,
                                                                     "attention_head_dim": 1024}))
    _refused(["inspect", model], capsys, "num_attention_heads x attention_head_dim is 1,048,576, more than 65,536")
