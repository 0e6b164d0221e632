"""The option matrix (issue 31): distillation in the combinations users run, 2 steps each, on both toys.

A covering array (every pair of values of any two factors appears in at least one run) over precision, full weights
or LoRA, AdamW or 8-bit AdamW, gradient checkpointing, validation, a 16-bit or NF4 teacher, 1 or 2 processes (gloo)
and prompts or an imagefolder, crossed with plans that together remove every component of every block kind, every
combination that leaves a part without a reader (a modulation; and, with --lambda_feat 0, a text-stream output), a
sliced FLUX single block and the last SD3 block. Beyond the array: Accelerate's FSDP2 through the trainer on two gloo
processes (tests/fsdp_on_cpu.py), its refusal of 8-bit AdamW, and a launch config's bf16 without a flag.

Each run asserts that the losses are finite, that every trainable parameter got a gradient on every process, and that
the saved folder loads in a fresh process and draws. The matrix and each run's outcome are printed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, imagefolder, run_process_group

from diffusers_hprune import PrunePlan, toy

ROOT = Path(__file__).resolve().parents[1]

#: Plans per toy (SD3: 12 joint blocks, 11 the context_pre_only last one; FLUX: 4 double blocks 0-3, 8 single 4-11).
PLANS = {
    # attn + ff_context (norm1_context unread), ff + norm1, norm1_context alone, and a whole block
    "sd3-a": ("sd3", {"removed_blocks": [10], "removed_components": {3: ["attn", "ff_context"], 5: ["ff", "norm1"],
                                                                      7: ["norm1_context"]}}, []),
    # attn + ff (norm1 unread), ff_context + norm1_context, the last block without attn (its norm1_context unread)
    "sd3-b": ("sd3", {"removed_components": {4: ["attn", "ff"], 6: ["ff_context", "norm1_context"], 11: ["attn"]}},
              []),
    # the last block's ff, norm1 and norm1_context; a joint block's attn; with --lambda_feat 0 (only the output
    # counts) and SD3's last block gone, the new last block's text output is read by nothing
    "sd3-c": ("sd3", {"removed_blocks": [9, 11], "removed_components": {2: ["attn"], 8: ["ff", "norm1", "norm1_context"]}},
              ["--lambda_feat", "0"]),
    # double: attn + ff_context (norm1_context unread); single: attn (proj_out sliced to the MLP columns), mlp
    # (sliced to the attention columns); a whole single block
    "flux-a": ("flux", {"removed_blocks": [11], "removed_components": {0: ["attn", "ff_context"], 5: ["attn"],
                                                                       7: ["mlp"]}}, []),
    # double: attn + ff (norm1 unread), ff_context + norm1_context; single: norm, attn + norm, mlp + norm
    "flux-b": ("flux", {"removed_components": {1: ["attn", "ff"], 3: ["ff_context", "norm1_context"], 6: ["norm"],
                                               8: ["attn", "norm"], 9: ["mlp", "norm"]}}, []),
    # double: ff, norm1; a whole double block; single slices in the first and the last single block
    "flux-c": ("flux", {"removed_blocks": [2], "removed_components": {0: ["ff", "norm1"], 4: ["mlp"], 11: ["attn"]}},
               []),
}
FACTORS = {
    "precision": ["no", "bf16"],
    "weights": ["full", "lora"],
    "optimizer": ["adamw", "adamw8bit"],
    "checkpointing": [False, True],
    "validation": [False, True],
    "teacher": ["16-bit", "nf4"],
    "processes": [1, 2],
    "data": ["prompts", "imagefolder"],
    "plan": list(PLANS),
}


def covering_array(factors: dict[str, list], seed: int = 0, candidates: int = 60) -> list[dict]:
    """Rows (one value per factor) in which every pair of values of two factors occurs at least once.

    Greedy (AETG): each row is the best of ``candidates`` rows built around an uncovered pair, factor by factor
    taking the value that covers most uncovered pairs with the values chosen so far. Deterministic for a seed.
    """
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rng = random.Random(seed)
    rows = []

    def gain(row: dict) -> int:
        return sum(((a, row[a]), (b, row[b])) in uncovered for a, b in itertools.combinations(names, 2))

    while uncovered:
        best, best_gain = None, -1
        for _ in range(candidates):
            (a, va), (b, vb) = rng.choice(sorted(uncovered, key=repr))
            row = {a: va, b: vb}
            for name in rng.sample(names, len(names)):
                if name in row:
                    continue
                row[name] = max(factors[name], key=lambda v: (sum(
                    ((x, row[x]), (name, v)) in uncovered or ((name, v), (x, row[x])) in uncovered
                    for x in row), rng.random()))
            row = {n: row[n] for n in names}
            g = gain(row)
            if g > best_gain:
                best, best_gain = row, g
        rows.append(best)
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return rows


def test_the_covering_array_covers_every_pair():
    rows = covering_array(FACTORS)
    names = list(FACTORS)
    for a, b in itertools.combinations(names, 2):
        seen = {(r[a], r[b]) for r in rows}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    assert len(rows) <= 2 * len(FACTORS["plan"]) * 2  # near the lower bound (6 plans x 2 values)


def _distill_args(row: dict, base: Path, out: Path) -> list[str]:
    family, _, extra = PLANS[row["plan"]]
    args = ["distill", "--teacher", family, "--plan", str(base / f"{row['plan']}.json"), "--output_dir", str(out),
            "--max_train_steps", "2", "--train_batch_size", "2", "--max_samples", "4", "--teacher_steps", "4",
            "--learning_rate", "1e-3", "--checkpointing_steps", "0", "--no-sgdistill", "--no-progress",
            "--cache_dir", str(base / "cache"), "--mixed_precision", row["precision"], *extra]
    if row["data"] == "prompts":
        args += ["--prompts", str(base / "prompts.txt")]
    else:
        args += ["--train_data_dir", str(base / "images")]
    if row["weights"] == "lora":
        args += ["--lora_rank", "4"]
    if row["optimizer"] == "adamw8bit":
        args += ["--use_8bit_adam"]
    if row["checkpointing"]:
        args += ["--gradient_checkpointing"]
    if row["validation"]:
        args += ["--validation_steps", "1", "--validation_prompt", "a red circle above a blue square"]
    if row["teacher"] == "nf4":
        args += ["--teacher_4bit"]
    return args


#: One run takes 10-20 s on a 2-core CI machine; a run past this is hung, and fails the test with each process's
#: stacks (run_process_group) instead of holding CI until its limit.
RUN_TIMEOUT = 300


def _launch(args: list[str], processes: int, *, script: str | None = None, config: str | None = None
            ) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1 and script is None and config is None:
        return run_process_group([sys.executable, "-m", "diffusers_hprune", *args], timeout=RUN_TIMEOUT, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", config] if config else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no",
                                                        "--mixed_precision", "no"]
    launch += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    launch += [script] if script else ["-m", "diffusers_hprune"]
    return run_process_group([*launch, *args], timeout=RUN_TIMEOUT, env=env)


DRAW = """
import json, sys, torch
import diffusers_hprune
from diffusers import DiffusionPipeline
from diffusers_hprune import toy
out = {}
for folder, family in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder)
    images = pipe(["a red circle"], **{**toy.generation_kwargs(family), "num_inference_steps": 2},
                  generator=torch.Generator().manual_seed(0)).images
    pixels = torch.tensor(list(images[0].getdata()), dtype=torch.float32)
    out[folder] = {"class": type(pipe).__name__, "plan": pipe.transformer.prune_plan.describe(),
                   "finite": bool(torch.isfinite(pixels).all()), "std": float(pixels.std())}
print("RESULT " + json.dumps(out))
"""


def assert_saved_folders_draw(saved: list[tuple[str, str]]) -> None:
    """Every ``(folder, family)`` loads in a fresh process and draws a finite, non-blank image."""
    draw = run_process_group([sys.executable, "-c", DRAW, json.dumps(saved)], timeout=RUN_TIMEOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [x for x in draw.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, draw.stderr[-3000:]
    drawn = json.loads(lines[-1][len("RESULT "):])
    assert all(drawn[folder]["finite"] and drawn[folder]["std"] > 0 for folder, _ in saved)


def _check_summary(summary: dict, processes: int) -> list[str]:
    """What a run must show (empty when it does)."""
    problems = []
    values = [v for step in summary["losses"] for k, v in step.items() if k != "step"]
    values += [summary["fixed_batch_loss"]["start"], summary["fixed_batch_loss"]["end"]]
    if not values or not all(math.isfinite(v) for v in values):
        problems.append("a loss that is not finite")
    if summary["trainable_without_gradient"] != [0] * processes:
        problems.append(f"trainable parameters without a gradient: {summary['trainable_without_gradient']}")
    if summary["processes"] != processes or not summary["ranks_identical"]:
        problems.append(f"processes {summary['processes']}, ranks identical {summary['ranks_identical']}")
    if summary["steps"] != 2:
        problems.append(f"{summary['steps']} steps")
    return problems


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_option_matrix(tmp_path, capsys):
    base = tmp_path
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=4)) + "\n")
    imagefolder(base / "images", n=4, seed=5)
    for name, (family, spec, _) in PLANS.items():
        config = json.loads((toy.model_path(family) / "transformer" / "config.json").read_text())
        blocks = int(config["num_layers"]) + int(config.get("num_single_layers", 0))
        PrunePlan(family=family, num_blocks=blocks, **spec).save(base / f"{name}.json")
    rows = covering_array(FACTORS)
    results, saved = [], []
    with capsys.disabled():  # a row as each run ends: a CI log shows how far the matrix got
        print(f"\noption matrix: {len(rows)} runs; each: run, {', '.join(FACTORS)}, seconds, exit code", flush=True)
    for k, row in enumerate(rows):
        out = base / f"run-{k}"
        start = time.perf_counter()
        proc = _launch(_distill_args(row, base, out), row["processes"])
        seconds = time.perf_counter() - start
        with capsys.disabled():
            print(f"  run {k}: {', '.join(str(row[f]) for f in FACTORS)}: {seconds:.0f} s, exit {proc.returncode}",
                  flush=True)
        problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"]
        summary = {}
        if not problems:
            summary = json.loads((out / "distill_summary.json").read_text())
            problems = _check_summary(summary, row["processes"])
            if row["validation"] and not (out / "validation" / "step-2.png").is_file():
                problems.append("no validation drawing")
            expected = {"no": "float32", "bf16": "bfloat16"}[row["precision"]]
            if summary["frozen_dtype"] != expected or summary["teacher_dtype"] != (
                    "nf4" if row["teacher"] == "nf4" else expected):
                problems.append(f"precision recorded {summary['frozen_dtype']} / {summary['teacher_dtype']}")
            if PLANS[row["plan"]][2] and not summary["frozen_off_the_loss"]:
                problems.append("nothing frozen off the loss with --lambda_feat 0")
            saved.append((str(out), PLANS[row["plan"]][0]))
        results.append((k, row, seconds, problems, summary))

    # Every saved folder loads in a fresh process and draws.
    draw = run_process_group([sys.executable, "-c", DRAW, json.dumps(saved)], timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"})
    lines = [x for x in draw.stdout.splitlines() if x.startswith("RESULT ")]
    drawn = json.loads(lines[-1][len("RESULT "):]) if lines else {}
    for k, _, _, problems, _ in results:
        entry = drawn.get(str(base / f"run-{k}"))
        if not problems and (entry is None or not entry["finite"] or not entry["class"].startswith("HierarchicalPruned")
                             or entry["std"] == 0):
            problems.append(f"the saved folder does not load and draw in a fresh process: {entry or draw.stderr[-800:]}")

    header = ["run", *FACTORS, "s", "outcome"]
    table = [header] + [[str(k), *[str(row[f]) for f in FACTORS], f"{seconds:.0f}", "ok" if not p else "FAILED"]
                        for k, row, seconds, p, _ in results]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    with capsys.disabled():
        print(f"\noption matrix: {len(rows)} runs covering every pair of {len(FACTORS)} factors")
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    failed = [(k, p) for k, _, _, p, _ in results if p]
    assert not failed, "\n".join(f"run {k}: {'; '.join(p)}" for k, p in failed)


@pytest.mark.slow
def test_fsdp2_through_the_trainer_on_two_processes(tmp_path, capsys):
    """Accelerate's FSDP2 with the shipped config (tests/fsdp_on_cpu.py makes gloo processes take it): bf16, LoRA,
    gradient checkpointing, validation every step (every process draws: the main one alone would hang in the sharded
    student's all-gather), a sliced FLUX plan; the clipping sees real gradients, the checksum is the whole model's and
    the gathered weights are the saved model (in bf16). 8-bit AdamW and the QLoRA student are refused under FSDP before
    anything is loaded."""
    base = tmp_path
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=4)) + "\n")
    family, spec, _ = PLANS["flux-a"]
    PrunePlan(family=family, num_blocks=12, **spec).save(base / "flux-a.json")
    config = str(ROOT / "examples" / "accelerate_configs" / "fsdp.yaml")
    script = str(ROOT / "tests" / "fsdp_on_cpu.py")
    results = []
    for label, extra, processes in (("full weights", [], 2), ("LoRA, checkpointing", ["--lora_rank", "4",
                                                                                       "--gradient_checkpointing"], 2)):
        out = base / label.replace(" ", "-").replace(",", "")
        row = {"plan": "flux-a", "precision": "bf16", "data": "prompts", "weights": "full", "optimizer": "adamw",
               "checkpointing": False, "validation": True, "teacher": "16-bit"}
        args = _distill_args(row, base, out) + extra
        proc = _launch(args, processes, script=script, config=config)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "distill_summary.json").read_text())
        assert summary["distributed"] == "FSDP" and not _check_summary(summary, processes)
        assert summary["mixed_precision"] == "bf16" and summary["trainable_dtype"] == "float32"
        assert all(step["grad_norm"] > 0 for step in summary["losses"])  # the prepared, sharded parameters' norm
        assert (out / "validation" / "step-2.png").is_file()
        draw = run_process_group([sys.executable, "-c", DRAW, json.dumps([(str(out), "flux")])], timeout=RUN_TIMEOUT,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "RESULT " in draw.stdout, draw.stderr[-2000:]
        import torch
        from diffusers import DiffusionPipeline

        saved = DiffusionPipeline.from_pretrained(out).transformer
        total = sum(float(p.detach().double().sum()) for p in saved.parameters())
        magnitude = sum(float(p.detach().double().abs().sum()) for p in saved.parameters())
        if not extra:  # with LoRA the checksum sums base weights and adapters, the saved model holds them merged
            # saved in bf16 (the weight dtype): each weight rounded to 8 significant bits, at most 2^-9 of its size
            assert abs(total - summary["rank_checksums"][0]) <= 2**-9 * magnitude
        assert summary["ranks_identical"]
        assert all(torch.isfinite(p).all() for p in saved.parameters())
        results.append(label)
    refused = _launch(_distill_args(dict(row, optimizer="adamw8bit"), base, base / "adam8"), 2, script=script,
                      config=config)
    assert refused.returncode != 0 and "--use_8bit_adam does not work under FSDP" in refused.stderr
    assert not (base / "adam8" / "model_index.json").exists()
    qlora = _launch(_distill_args(dict(row, weights="lora", teacher="nf4"), base, base / "qlora"), 2, script=script,
                    config=config)
    assert qlora.returncode != 0 and "(the QLoRA student) does not run under FSDP" in qlora.stderr
    assert not (base / "qlora" / "model_index.json").exists()
    with capsys.disabled():
        print(f"\nFSDP2 through the trainer (2 gloo processes): {', '.join(results)}: ok; 8-bit AdamW: refused")


@pytest.mark.slow
def test_a_launch_config_in_bf16_without_the_flag_runs_in_bf16(tmp_path):
    """`accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml` (mixed_precision: bf16) and no
    --mixed_precision: the run is bf16 (the flag's old default, no, overrode the config: an fp32 teacher)."""
    base = tmp_path
    (base / "prompts.txt").write_text("\n".join(toy.prompts(split="train", n=6, seed=4)) + "\n")
    family, spec, _ = PLANS["sd3-a"]
    PrunePlan(family=family, num_blocks=12, **spec).save(base / "sd3-a.json")
    row = {"plan": "sd3-a", "precision": "no", "data": "prompts", "weights": "full", "optimizer": "adamw",
           "checkpointing": False, "validation": False, "teacher": "16-bit"}
    args = _distill_args(row, base, base / "out")
    i = args.index("--mixed_precision")
    del args[i:i + 2]
    proc = _launch(args, 2, config=str(ROOT / "examples" / "accelerate_configs" / "multi_gpu.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((base / "out" / "distill_summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["teacher_dtype"] == "bfloat16"
    assert summary["processes"] == 2 and not _check_summary(summary, 2)


@pytest.mark.slow
def test_the_three_reproductions_of_issue_31_exit_0_and_leave_pipelines_that_load(tmp_path):
    """Issue 31's reproductions, as its reporter ran them on the SD3 toy (plan: block 10, and attn + ff_context of
    block 3; 40 prompts, --max_samples 8 --train_batch_size 2): bf16 with validation every step; two DDP processes;
    and on the FLUX toy --teacher_4bit with single blocks without attn and without mlp."""
    base = tmp_path
    (base / "p.txt").write_text("\n".join(toy.prompts(split="train", n=40, seed=1)) + "\n")
    PrunePlan.from_dict({"family": "sd3", "num_blocks": 12, "removed_blocks": [10],
                         "removed_components": {"3": ["attn", "ff_context"]}}).save(base / "plan.json")
    PrunePlan.from_dict({"family": "flux", "num_blocks": 12, "removed_blocks": [],
                         "removed_components": {"4": ["attn"], "5": ["mlp"]}}).save(base / "flux.json")
    common = ["--prompts", str(base / "p.txt"), "--max_samples", "8", "--train_batch_size", "2", "--no-progress"]
    runs = {
        "bf16-validation": (["distill", "--teacher", "sd3", "--plan", str(base / "plan.json"), "--output_dir",
                             str(base / "o1"), "--mixed_precision", "bf16", "--validation_steps", "1",
                             "--max_train_steps", "2", *common], 1, "sd3"),
        "ddp": (["distill", "--teacher", "sd3", "--plan", str(base / "plan.json"), "--output_dir", str(base / "o2"),
                 "--max_train_steps", "2", *common], 2, "sd3"),
        "teacher-4bit": (["distill", "--teacher", "flux", "--plan", str(base / "flux.json"), "--output_dir",
                          str(base / "o3"), "--teacher_4bit", "--max_train_steps", "2", *common], 1, "flux"),
    }
    saved = []
    for name, (args, processes, family) in runs.items():
        proc = _launch(args, processes)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        saved.append((args[args.index("--output_dir") + 1], family))
    assert_saved_folders_draw(saved)
    assert (base / "o1" / "validation" / "step-2.png").is_file()
