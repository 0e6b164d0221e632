"""Bad inputs and faults, tried on every command as a hostile user would: how each one ends.

Each case runs ``hprune ...`` (in this process, or in a fresh one where the environment matters)
in a workspace of real files: the toy pipelines, an analysis, plans, a finished distillation
run, pruned and quantised folders. Cases of the command ``library`` make the calls a Diffusers user
makes instead (``save_pretrained(variant=...)``, ``load_lora_weights``). A case ends as

- **clear error**: exit code 2 with one ``hprune CMD: error: ...`` (or argparse) message, no traceback (for
  a library call: one of the package's errors, ``HPruneError``, with its message);
- **handled**: a valid input that the command accepted and got right (checked per case);
- **traceback**: an exception escaped;
- **wrong**: a bad input accepted (exit 0), or a valid one that gave a wrong result or was refused;
- **files lost**: a file that existed before the case changed or disappeared (for error cases any
  change; for accepted ones any change outside the outputs the case names);
- **leftovers**: a hidden scratch file or folder (``.*.tmp``, ``.*.old``, ``.pipeline.*``) stayed in
  the case folder after the command ended, or a full disk kept anything at all;
- **not run**: a fault this machine cannot make (mounting a small tmpfs needs root).

Faults: a **full disk** (the output on a 300 KiB tmpfs mounted for the case) must be one clear error
naming the output, with nothing left on that disk; **SIGTERM** is sent to a fresh ``hprune`` process
the moment its first scratch entry appears beside the output, and must end it with exit 143, no
scratch left and no output that looks complete (a ``model_index.json``) without its weights.

    python benchmarks/bad_inputs.py            # ~10 min on 2 CPU cores; rewrites its BENCHMARKS.md section
    python benchmarks/bad_inputs.py --list     # the cases, without running them
    python benchmarks/bad_inputs.py -k distill # only cases whose command or text contains "distill" (-k again: or)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, update_section  # noqa: E402

OUTCOMES = ("clear error", "handled", "traceback", "wrong", "files lost", "leftovers", "not run")
SCRATCH = re.compile(r"\..+\.(tmp|old)(\.[A-Za-z0-9]+)?|\.pipeline\.[a-z0-9_]+|\.checkpoint-\d+\.tmp")


@dataclass
class Case:
    command: str
    what: str
    argv: Callable[[Path], list[str]]  # given the case's folder (a copy of the workspace's fixtures lives in ws)
    expect: str = "error"  # "error" or "ok"
    phrase: str | None = None  # a phrase the message must hold (case, "_" / "-" and line breaks aside)
    check: Callable[[Path], bool] | None = None  # for "ok": the result is right
    setup: Callable[[Path], None] | None = None  # prepares the case folder (copies, damage)
    writes: tuple[str, ...] = ()  # paths (relative to the case folder) an accepted case may change
    env: dict = field(default_factory=dict)  # run in a fresh process with these variables
    fault: str | None = None  # "disk full" (the output on folder/small, a small tmpfs) or "sigterm"
    signal_on: str = ".*"  # sigterm: sent when a scratch entry whose name matches this appears
    call: Callable[[Path], bool] | None = None  # a library call instead of `hprune argv`: its result is the check


# -- the workspace: real inputs, built once ----------------------------------------------------------
def build_workspace(ws: Path) -> None:
    """Analysis, plans, prompts, a finished distillation run and pruned / NF4 folders of the SD3 toy."""
    from diffusers_hprune import toy
    from diffusers_hprune.analysis import analyze
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.cli import main
    from diffusers_hprune.pipelines.pruned import prune_pipeline
    from diffusers_hprune.planning import make_plan
    from diffusers_hprune.quantization.folder import quantize_pipeline

    ws.mkdir(parents=True, exist_ok=True)
    pipe = toy.load_pipeline("sd3")
    report = analyze(pipe, ws / "analysis.json", n_prompts=2, eval_steps=1, progress=False)
    plan = make_plan(report.contributions(), inspect_transformer(pipe.transformer), ratio=0.3).plan
    plan.save(ws / "plan.json")
    blocks = make_plan(report.contributions(), inspect_transformer(pipe.transformer), ratio=0.2,
                       strategy="koala", similarity=report.similarity).plan  # whole blocks (bk-sdm needs alignment)
    blocks.save(ws / "blocks-plan.json")
    from diffusers_hprune.hub.export import export_folder

    prune_pipeline(toy.load_pipeline("sd3"), blocks).save_pretrained(ws / "blocks-pruned")
    export_folder(ws / "blocks-pruned", ws / "stock", format="stock")
    (ws / "train.txt").write_text("\n".join(toy.prompts(split="train", n=8, seed=1)) + "\n", encoding="utf-8")
    (ws / "latin1.txt").write_bytes("un cercle rouge \xe0 gauche\n".encode("latin-1"))
    prune_pipeline(pipe, plan).save_pretrained(ws / "pruned")
    quantize_pipeline(ws / "pruned", ws / "nf4", overwrite=True)
    toy_folder = Path(toy.model_path("sd3"))
    shutil.copytree(toy_folder, ws / "teacher")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        code = main(distill_args(ws, ws / "run", "--max_train_steps", "10", "--checkpointing_steps", "5"))
    if code != 0:
        raise SystemExit(f"building the workspace: the reference distillation failed:\n{quiet.getvalue()}")


def distill_args(ws: Path, out: Path, *extra: str, teacher="sd3", plan=None, analysis=None, prompts=None,
                 cache=None) -> list[str]:
    """The reference distillation's command line (the workspace's inputs unless others are given), into ``out``."""
    return ["distill", "--teacher", str(teacher), "--plan", str(plan or ws / "plan.json"),
            "--analysis", str(analysis or ws / "analysis.json"), "--prompts", str(prompts or ws / "train.txt"),
            "--output_dir", str(out), "--train_batch_size", "2", "--cache_dir", str(cache or ws / "cache"),
            "--no_progress", *extra]


# -- running a case ----------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    state = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            state[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def run_case(case: Case, ws: Path, folder: Path) -> tuple[str, str]:
    """``(outcome, detail)`` of one case, run in ``folder`` (which holds a link to the workspace)."""
    if case.fault == "disk full" and not _mount_small(folder / "small"):
        return "not run", "cannot mount a tmpfs here (needs root)"
    try:
        return _run_case(case, ws, folder)
    finally:
        if case.fault == "disk full":
            subprocess.run(["umount", str(folder / "small")], capture_output=True)


def _mount_small(path: Path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _scratch_left(folder: Path) -> list[str]:
    found = []
    for p in folder.rglob("*"):
        if "ws" in p.relative_to(folder).parts[:1]:
            continue
        if SCRATCH.fullmatch(p.name):
            found.append(str(p.relative_to(folder)))
    return found


def _terminated(argv: list[str], folder: Path, when: str) -> tuple[int, str, bool]:
    """Run ``hprune argv`` in a fresh process and SIGTERM it when a scratch entry matching ``when`` appears in
    ``folder``."""
    proc = subprocess.Popen([sys.executable, "-m", "diffusers_hprune", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    sent = False
    while proc.poll() is None and time.monotonic() < deadline:
        if any(re.fullmatch(when, Path(p).name) for p in _scratch_left(folder)):
            proc.send_signal(signal.SIGTERM)
            sent = True
            break
        time.sleep(0.002)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, err, sent


def _run_case(case: Case, ws: Path, folder: Path) -> tuple[str, str]:
    from diffusers_hprune.cli import main

    if case.setup:
        case.setup(folder)
    before = snapshot(ws), snapshot(folder)
    argv = case.argv(folder) if case.argv else []
    err, out = io.StringIO(), io.StringIO()
    code, crashed = None, None
    if case.call is not None:
        return _run_call(case, ws, folder, before)
    if case.fault == "sigterm":
        code, text, sent = _terminated(argv, folder, case.signal_on)
        if not sent:
            return "not run", f"exit {code} before a scratch entry matching {case.signal_on!r} was seen"
        left = _scratch_left(folder)
        if "Traceback (most recent call last)" in text and code != 128 + signal.SIGTERM:
            return "traceback", text.strip().splitlines()[-1][:160]
        if left:
            return "leftovers", ", ".join(left[:3])
        half = [str(p.parent.relative_to(folder)) for p in folder.rglob("model_index.json")
                if "ws" not in p.relative_to(folder).parts[:1] and not list(p.parent.glob("transformer/*.safetensors"))]
        if half:
            return "wrong", f"{half[0]} has model_index.json but no transformer weights"
        if code not in (0, 128 + signal.SIGTERM):
            return "wrong", f"exit {code} after SIGTERM"
        return "handled", f"exit {code}, nothing left"
    if case.env:
        proc = subprocess.run([sys.executable, "-m", "diffusers_hprune", *argv], capture_output=True, text=True,
                              env={**os.environ, **case.env}, timeout=600)
        code, text = proc.returncode, proc.stderr
        out.write(proc.stdout)
        if "Traceback (most recent call last)" in text:
            crashed = text.strip().splitlines()[-1]
    else:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code
            except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
                crashed = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=err)
        text = err.getvalue()
    message = next((line for line in reversed(text.strip().splitlines()) if "error" in line.lower()), "")
    lost = _lost(before[0], snapshot(ws), ()) + _lost(before[1], snapshot(folder),
                                                      case.writes if case.expect == "ok" else ())
    if crashed:
        return "traceback", crashed[:160]
    if lost:
        return "files lost", ", ".join(lost[:3])
    left = _scratch_left(folder)
    if case.fault == "disk full" and (folder / "small").is_dir():
        left += [str(p.relative_to(folder)) for p in (folder / "small").iterdir()]
    if left:
        return "leftovers", ", ".join(sorted(set(left))[:3])
    if case.expect == "error":
        if code == 0:
            return "wrong", "accepted (exit 0)"
        said = text[text.rfind("error:"):]  # the message itself, not the usage line argparse prints above it
        if code == 2 and message and (case.phrase is None or _norm(case.phrase) in _norm(said)):
            return "clear error", message[:200]
        return "wrong", f"exit {code}, message {message[:160]!r} (wanted {case.phrase!r})"
    if code != 0:
        return "wrong", f"valid input refused: exit {code}: {message[:160]}"
    (folder / ".stdout").write_text(out.getvalue())  # for the checks
    if case.check and not case.check(folder):
        return "wrong", "accepted, but the result is wrong"
    return "handled", "ok"


def _run_call(case: Case, ws: Path, folder: Path, before: tuple[dict, dict]) -> tuple[str, str]:
    """A library call as a Diffusers user makes it: the package's errors (``HPruneError``) are its clear errors,
    anything else is a traceback; a call that returns gives its own check (True: right)."""
    from diffusers_hprune.utils.errors import HPruneError

    quiet = io.StringIO()
    result, message = None, None
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            result = case.call(folder)
    except HPruneError as e:
        message = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
        return "traceback", f"{type(e).__name__}: {e}"[:160]
    lost = _lost(before[0], snapshot(ws), ()) + _lost(before[1], snapshot(folder), case.writes)
    if lost:
        return "files lost", ", ".join(lost[:3])
    if case.expect == "error":
        if message is None:
            return "wrong", "accepted"
        if case.phrase is None or _norm(case.phrase) in _norm(message):
            return "clear error", message[:200]
        return "wrong", f"message {message[:160]!r} (wanted {case.phrase!r})"
    if message is not None:
        return "wrong", f"valid call refused: {message[:160]}"
    return ("handled", "ok") if result else ("wrong", "accepted, but the result is wrong")


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", "-").split())


def _lost(before: dict, after: dict, allowed: tuple[str, ...]) -> list[str]:
    def is_allowed(name):
        return any(name == a or name.startswith(a.rstrip("/") + "/") for a in allowed)

    return [name for name, digest in before.items() if after.get(name) != digest and not is_allowed(name)]


# -- the cases ---------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def W(folder: Path) -> Path:  # noqa: N802 - the workspace, seen from a case folder
    return folder / "ws"


def _copy(name: str, target: str | None = None):
    def setup(folder: Path):
        src = W(folder) / name
        dst = folder / (target or name)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    return setup


def _plan_with(**fields):
    def setup(folder: Path):
        data = json.loads((W(folder) / "plan.json").read_text())
        data.update(fields)
        (folder / "plan.json").write_text(json.dumps(data))
    return setup


def _analysis_with(edit):
    def setup(folder: Path):
        data = json.loads((W(folder) / "analysis.json").read_text())
        edit(data)
        (folder / "analysis.json").write_text(json.dumps(data))
    return setup


def _truncate(path: str):
    def setup(folder: Path):
        target = folder / path
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return setup


def _chain(*steps):
    def setup(folder: Path):
        for step in steps:
            step(folder)
    return setup


def _readonly(folder: Path) -> None:
    """``folder/ro``: a folder this user cannot write into (for root, which ignores modes: immutable)."""
    (folder / "ro").mkdir()
    os.chmod(folder / "ro", 0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder / "ro")], check=True, capture_output=True)


def _writable_again(folder: Path) -> None:
    ro = folder / "ro"
    if ro.is_dir():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        os.chmod(ro, 0o755)


def can_make_unwritable() -> bool:
    """Whether this user can have a folder it cannot write into (root needs ``chattr +i``)."""
    if os.geteuid() != 0:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _readonly(Path(tmp))
        except (OSError, subprocess.CalledProcessError):
            return False
        _writable_again(Path(tmp))
    return True


def _user_files(folder: Path) -> None:
    for name in ("U/vae/NOTES.txt", "U/scheduler/keep.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("the user's own notes\n")


def _fixed(name: str):
    return lambda folder: [s.replace("{ws}", str(W(folder))).replace("{case}", str(folder)) for s in name.split()]


def cases() -> list[Case]:
    out: list[Case] = []

    def add(command, what, argv, **kw):
        out.append(Case(command, what, argv if argv is None or callable(argv) else _fixed(argv), **kw))

    # Numbers and spellings refused where they enter (argparse or the config), per command.
    numeric = {
        "analyze": ("analyze sd3 --out {case}/a.json", [
            ("--steps", "0"), ("--eval-steps", "0"), ("--batch-size", "0"), ("--n-prompts", "0"), ("--height", "7"),
            ("--width", "18"), ("--height", "-16"), ("--guidance-scale", "nan"), ("--seed", "x"),
            ("--max-cache-bytes", "4XB"), ("--metric", "nosuch"), ("--images auto --plan-ratios", "1.2"),
            ("--images auto --confidence", "1"), ("--images auto --min-images", "0"), ("--images", "some"), ("--component-images", "0")]),
        "evaluate": ("evaluate sd3 --out {case}/e.json", [
            ("--steps", "0"), ("--n", "0"), ("--batch-size", "0"), ("--latency-repeats", "0"), ("--warmup", "-1"),
            ("--grid-size", "0"), ("--height", "7"), ("--guidance-scale", "inf")]),
        "plan": ("plan {ws}/analysis.json --out {case}/p.json", [
            ("--ratio", "0"), ("--ratio", "1.5"), ("--ratio", "nan"), ("--memory", "0"), ("--memory", "4XB"),
            ("--ratio 0.3 --alpha", "nan"), ("--ratio 0.3 --r-thres", "2"), ("--ratio 0.3 --strategy", "magic")]),
        "distill": (None, [
            ("--gradient_accumulation_steps", "0"), ("--train_batch_size", "0"), ("--learning_rate", "-1"),
            ("--learning_rate", "nan"), ("--lambda_feat", "nan"), ("--lambda_task", "-1"), ("--checkpointing_steps", "-1"),
            ("--max_train_steps", "0"), ("--max_train_minutes", "0"), ("--resolution", "7"), ("--lora_rank", "-1"),
            ("--checkpoints_total_limit", "0"), ("--max_grad_norm", "nan"), ("--r_thres", "1.5"),
            ("--sensitivity_floor", "-1")]),
        "compress": ("compress sd3 --out {case}/c", [
            ("--pwp", "flase"), ("--sgdistill", "maybe"), ("--learning-rate", "nan"), ("--learning-rate", "-1"),
            ("--ratio", "2"), ("--max-train-steps", "0"), ("--train-batch-size", "0"), ("--eval-prompts", "0"),
            ("--max-train-minutes", "-5"), ("--lora-rank", "-1"), ("--checkpointing-steps", "-1"),
            ("--gpu-memory", "-3"), ("--teacher-4bit", "maybe"), ("--vae-tiling", "maybe"),
            ("--eval-batch-size", "0")]),
        "demo": ("demo --out {case}/d", [("--ratio", "0"), ("--pwp", "flase"), ("--max-train-minutes", "nan")]),
        "budget": ("budget sd3.5-large", [("--ratio", "nan"), ("--resolution", "0"), ("--train-batch-size", "0"),
                                           ("--num-processes", "0"), ("--lora-rank", "-1"), ("--n-prompts", "0"),
                                           ("--gpu-memory", "0GB"), ("--gpu-memory", "apples"),
                                           ("--eval-batch-size", "0")]),
        "toy-train": ("toy-train --out {case}/t", [("--minutes", "0"), ("--minutes", "nan")]),
    }
    for command, (base, flags) in numeric.items():
        for flag, value in flags:
            if command == "distill":
                argv = (lambda f, v: lambda folder: distill_args(W(folder), folder / "D", f, v))(flag, value)
            else:
                argv = (lambda b, f, v: lambda folder: _fixed(b)(folder) + f.split() + [v])(base, flag, value)
            name = flag.split()[-1].lstrip("-")
            phrase = {"--height": "height", "--width": "width", "--metric": "metric"}.get(flag, name)
            add(command, f"`{flag} {value}`", argv, phrase=phrase)

    # The adaptive analysis: its flags without it, and what it cannot measure.
    add("analyze", "`--plan-ratios` without `--images auto`", "analyze sd3 --out {case}/a.json --plan-ratios 0.3",
        phrase="--images auto")
    add("analyze", "`--images auto --metric velocity`", "analyze sd3 --out {case}/a.json --images auto --metric velocity",
        phrase="velocity metric compares predictions")
    add("analyze", "`--component-images` not a multiple of `--batch-size`",
        "analyze sd3 --out {case}/a.json --component-images 6 --batch-size 4", phrase="multiple of --batch-size 4")
    add("analyze", "`--component-images` with `--metric velocity`",
        "analyze sd3 --out {case}/a.json --n-prompts 4 --component-images 2 --batch-size 2 --metric velocity",
        phrase="--component-images counts images")
    add("analyze", "`--images auto --min-images 1`", "analyze sd3 --out {case}/a.json --images auto --min-images 1",
        phrase="at least 2 images")

    # A GPU too small for a stage even with every remedy: refused before anything is loaded or written.
    add("compress", "`--gpu-memory` too small for the analysis", "compress sd3 --out {case}/c --gpu-memory 1MB",
        phrase="does not fit")
    add("budget", "`--gpu-memory` with `--device cpu`", "budget sd3 --device cpu --gpu-memory 24GB",
        phrase="--device cuda")

    # Text files that are not UTF-8, missing, or folders.
    add("analyze", "non-UTF-8 `--prompts`", "analyze sd3 --out {case}/a.json --prompts {ws}/latin1.txt", phrase="UTF-8")
    add("analyze", "`--prompts` is a folder", "analyze sd3 --out {case}/a.json --prompts {ws}/run", phrase="folder")
    add("evaluate", "non-UTF-8 `--prompts`", "evaluate sd3 --prompts {ws}/latin1.txt --n 2", phrase="UTF-8")
    add("distill", "non-UTF-8 `--prompts`",
        lambda f: distill_args(W(f), f / "D", prompts=W(f) / "latin1.txt"),
        phrase="UTF-8")
    add("plan", "non-UTF-8 analysis", "plan {ws}/latin1.txt --ratio 0.3 --out {case}/p.json", phrase="UTF-8")
    add("report", "non-UTF-8 analysis", "report {ws}/latin1.txt --out {case}/r", phrase="UTF-8")
    add("report", "non-UTF-8 `--plan`", "report {ws}/analysis.json --plan {ws}/latin1.txt --out {case}/r", phrase="UTF-8")
    add("distill", "non-UTF-8 `--plan`",
        lambda f: distill_args(W(f), f / "D", plan=W(f) / "latin1.txt"),
        phrase="UTF-8")

    # Plan files of the wrong JSON types.
    for what, fields_ in [('`"removed_blocks": "12"`', {"removed_blocks": "12"}),
                          ("`\"removed_blocks\": [true]`", {"removed_blocks": [True]}),
                          ('`"removed_blocks": null`', {"removed_blocks": None}),
                          ('`"removed_components": {"2": 5}`', {"removed_components": {"2": 5}}),
                          ('`"num_blocks": 1e9`', {"num_blocks": 1e9}),
                          ('`"family": 3`', {"family": 3})]:
        add("distill", f"plan with {what}",
            lambda f: distill_args(W(f), f / "D", plan=f / "plan.json"),
            setup=_plan_with(**fields_), phrase=next(iter(fields_)))
        add("report", f"plan with {what}", "report {ws}/analysis.json --plan {case}/plan.json --out {case}/r",
            setup=_plan_with(**fields_), phrase=next(iter(fields_)))

    # Analysis files that lie.
    add("plan", "analysis claiming `num_layers: 1e9`", "plan {case}/analysis.json --ratio 0.3 --out {case}/p.json",
        setup=_analysis_with(lambda d: d["transformer_config"].update(num_layers=10**9) or d.update(num_blocks=10**9)),
        phrase="10000")
    add("plan", "analysis with an out-of-range entry", "plan {case}/analysis.json --ratio 0.3 --out {case}/p.json",
        setup=_analysis_with(lambda d: d["entries"].append({**d["entries"][0], "block": 99})), phrase="99")
    add("plan", "analysis that is not JSON", "plan {ws}/train.txt --ratio 0.3 --out {case}/p.json", phrase="JSON")
    add("plan", "missing analysis", "plan {case}/nothing.json --ratio 0.3 --out {case}/p.json", phrase="nothing.json")
    add("plan", "analysis of another family's entries", "plan {case}/analysis.json --ratio 0.3 --out {case}/p.json",
        setup=_analysis_with(lambda d: d["entries"].append({**d["entries"][0], "component": "mlp"})), phrase="mlp")

    # Output paths: a folder where a file goes, a file where a folder goes, unwritable.
    def _file(folder):
        (folder / "afile").write_text("x\n")
    unwritable = can_make_unwritable()
    outputs = [
        ("analyze", "analyze sd3 --n-prompts 2 --eval-steps 1 --out {OUT}.json"),
        ("plan", "plan {ws}/analysis.json --ratio 0.3 --out {OUT}.json"),
        ("report", "report {ws}/analysis.json --out {OUT}"),
        ("evaluate", "evaluate sd3 --n 2 --no-cost --out {OUT}.json"),
        ("quantize", "quantize {ws}/pruned --out {OUT}"),
        ("export", "export {ws}/pruned --out {OUT}"),
        ("compress", "compress sd3 --out {OUT}"),
        ("demo", "demo --out {OUT}"),
    ]
    for command, template in outputs:
        if command in ("analyze", "plan", "evaluate"):
            add(command, "`--out` is a folder", template.replace("{OUT}.json", "{case}"), phrase="is a folder")
        else:
            add(command, "`--out` is an existing file", template.replace("{OUT}", "{case}/afile"), setup=_file,
                phrase="is a file")
        add(command, "`--out` inside a file", template.replace("{OUT}", "{case}/afile/x"), setup=_file,
            phrase="is a file")
        if unwritable:
            add(command, "`--out` in a read-only folder", template.replace("{OUT}", "{case}/ro/x"), setup=_readonly,
                phrase="not writable")
    if unwritable:
        add("evaluate", "`--grid` in a read-only folder", "evaluate sd3 --n 2 --no-cost --grid {case}/ro/g.png",
            setup=_readonly, phrase="not writable")
    add("distill", "`--output_dir` is a file", lambda f: distill_args(W(f), f / "afile"), setup=_file,
        phrase="is a file")

    # The user's files and finished work.
    add("distill", "`--output_dir` holding the user's files (vae/NOTES.txt)", lambda f: distill_args(W(f), f / "U"),
        setup=_user_files, phrase="not empty")
    add("distill", "`--output_dir` holding the user's files, `--overwrite`",
        lambda f: distill_args(W(f), f / "U", "--overwrite"), setup=_user_files, phrase="not empty")
    add("compress", "`--out` holding the user's files", "compress sd3 --out {case}/U", setup=_user_files,
        phrase="not an hprune compress run")
    add("distill", "`--output_dir` equal to the teacher folder, `--overwrite`",
        lambda f: distill_args(W(f), f / "teacher", "--overwrite", teacher=f / "teacher"),
        setup=_copy("teacher"), phrase="teacher")
    add("distill", "`--output_dir` equal to the teacher folder",
        lambda f: distill_args(W(f), f / "teacher", teacher=f / "teacher"),
        setup=_copy("teacher"), phrase="teacher")
    add("distill", "`--output_dir` inside the teacher folder",
        lambda f: distill_args(W(f), f / "teacher" / "out", teacher=f / "teacher"),
        setup=_copy("teacher"), phrase="teacher")
    def _carded(folder):
        shutil.copytree(W(folder) / "nf4", folder / "nf4")
        (folder / "nf4" / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# my model\n\nmy notes\n")
    add("push", "`--repo-id noslash --base-model foo` (the card must stay)",
        "push {case}/nf4 --repo-id noslash --base-model foo", setup=_carded, phrase="--repo-id")
    add("push", "`--repo-id 'me/bad name!'`", lambda f: ["push", str(f / "nf4"), "--repo-id", "me/bad name!"],
        setup=_carded, phrase="--repo-id")
    add("push", "without a model card", "push {case}/nf4 --repo-id me/model", setup=_copy("nf4"), phrase="model card",
        env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"})
    add("push", "offline", "push {case}/nf4 --repo-id me/model", setup=_carded,
        env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}, phrase="Hub")

    # Resume: another run's settings, damaged checkpoints and caches.
    for flag, value in [("--learning_rate", "1e-2"), ("--seed", "7"), ("--train_batch_size", "4"),
                        ("--lambda_feat", "0.5"), ("--no_pwp", None), ("--mixed_precision", "bf16")]:
        extra = [flag] + ([value] if value else [])
        add("distill", f"resume with `{' '.join(extra)}`",
            (lambda e: lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest",
                                              "--max_train_steps", "15", *e))(extra),
            setup=_copy("run"), phrase=flag.lstrip("-").replace("no_", ""))
    resume = lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest",  # noqa: E731
                                    "--max_train_steps", "12")
    add("distill", "resume from a truncated checkpoint `model.safetensors`", resume,
        setup=_chain(_copy("run"), _truncate("run/checkpoint-10/model.safetensors")), phrase="model.safetensors")
    add("distill", "resume from a checkpoint without `optimizer.bin`", resume,
        setup=_chain(_copy("run"), lambda f: (f / "run/checkpoint-10/optimizer.bin").unlink()), phrase="optimizer")

    def _damaged_cache(folder):
        shutil.copytree(W(folder) / "cache", folder / "cache")
        arrow = sorted((folder / "cache").rglob("*.arrow"))[0]
        arrow.write_bytes(arrow.read_bytes()[:100])
    add("distill", "truncated data-cache Arrow file",
        lambda f: distill_args(W(f), f / "D", "--max_train_steps", "2", cache=f / "cache"),
        setup=_damaged_cache, phrase="cache")

    # Valid inputs that must do the right thing.
    add("distill", "`checkpoint-best` beside `--checkpoints_total_limit 1` (kept)",
        lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "15",
                               "--checkpointing_steps", "5", "--checkpoints_total_limit", "1"),
        setup=_chain(_copy("run"), lambda f: (f / "run" / "checkpoint-best").mkdir()), expect="ok",
        writes=("run",), check=lambda f: (f / "run/checkpoint-best").is_dir() and (f / "run/checkpoint-15").is_dir()
        and not (f / "run/checkpoint-10").exists())

    def _leftover(folder):
        shutil.copytree(W(folder) / "run", folder / "run")
        (folder / "run" / ".pipeline.abc123").mkdir()
        (folder / "run" / ".pipeline.abc123" / "big.safetensors").write_bytes(b"0" * 1000)
    add("distill", "an interrupted save's `.pipeline.XXXX` left in OUT (removed at the next start)",
        lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "11"),
        setup=_leftover, expect="ok", writes=("run",), check=lambda f: not (f / "run/.pipeline.abc123").exists())
    add("distill", "resume with the run's own settings, longer (summary covers the whole run)",
        lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "12"),
        setup=_copy("run"), expect="ok", writes=("run",),
        check=lambda f: [r["step"] for r in json.loads((f / "run/distill_summary.json").read_text())["losses"]]
        == list(range(1, 13)))

    def _killed_analysis(folder):  # what `analyze --overwrite` killed mid-way left: a part file, no OUT
        data = json.loads((W(folder) / "analysis.json").read_text())
        data["entries"] = data["entries"][:5]
        (folder / "a.json.parts").mkdir()
        (folder / "a.json.parts" / "rank-0.json").write_text(json.dumps(data))
    add("analyze", "`--overwrite` again after a killed `--overwrite` run (finished entries reused)",
        "analyze sd3 --out {case}/a.json --n-prompts 2 --eval-steps 1 --overwrite", setup=_killed_analysis,
        expect="ok", writes=("a.json", "a.json.parts"),
        check=lambda f: "(5 reused" in (f / ".stdout").read_text()
        and json.loads((f / "a.json").read_text())["entries"] == json.loads((W(f) / "analysis.json").read_text())["entries"])

    compress_small = ("compress sd3 --out {case}/c --analysis-prompts 2 --eval-steps 1 --train-prompts 8 "
                      "--train-batch-size 2 --max-train-steps 4 --checkpointing-steps 2 --eval-prompts 2 "
                      "--latency-repeats 1 --quantize none")

    def _compressed(folder):
        quiet = io.StringIO()
        from diffusers_hprune.cli import main
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            assert main(_fixed(compress_small)(folder)) == 0, quiet.getvalue()
    add("compress", "the same run again with another `--learning-rate` (the distillation starts again)",
        lambda f: _fixed(compress_small)(f) + ["--learning-rate", "0.002"], setup=_compressed, expect="ok",
        writes=("c",), check=lambda f: "[4] distilled: its settings changed" in (f / ".stdout").read_text()
        and json.loads((f / "c/4-distilled/hprune_run.json").read_text())["learning_rate"] == 0.002
        and [r["step"] for r in json.loads((f / "c/4-distilled/distill_summary.json").read_text())["losses"]]
        == [1, 2, 3, 4])
    add("plan", "outputs keep the user's umask (0644 under umask 022)",
        "plan {ws}/analysis.json --ratio 0.3 --out {case}/p.json", expect="ok",
        check=lambda f: (f / "p.json").stat().st_mode & 0o777 == 0o666 & ~_umask())
    add("quantize", "`--out` folders keep the user's umask (0755 under umask 022)",
        "quantize {ws}/pruned --out {case}/q", expect="ok",
        check=lambda f: all(p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~_umask()
                            for p in [f / "q", *(f / "q").rglob("*")]))

    # More resumes that belong to another run, and other inputs a run cannot use.
    for flag, value in [("--gradient_accumulation_steps", "2"), ("--lora_rank", "4"), ("--r_thres", "0.5"),
                        ("--sensitivity_floor", "0.1"), ("--binary_freeze", None), ("--logit_mean", "0.5"),
                        ("--max_grad_norm", "0.5"), ("--no_sgdistill", None), ("--lambda_task", "0.5"),
                        ("--adam_weight_decay", "0.01")]:
        extra = [flag] + ([value] if value else [])
        add("distill", f"resume with `{' '.join(extra)}`",
            (lambda e: lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest",
                                              "--max_train_steps", "15", *e))(extra),
            setup=_copy("run"), phrase="another run")

    def _other_prompts(folder):
        shutil.copytree(W(folder) / "run", folder / "run")
        (folder / "other.txt").write_text("a red circle\na blue square\na green triangle\n")
    add("distill", "resume with other `--prompts`",
        lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "15",
                               prompts=f / "other.txt"),
        setup=_other_prompts, phrase="data")
    add("distill", "resume with another `--plan`",
        lambda f: distill_args(W(f), f / "run", "--resume_from_checkpoint", "latest", "--max_train_steps", "15",
                               plan=W(f) / "blocks-plan.json"),
        setup=_copy("run"), phrase="plan")
    add("distill", "`--resume_from_checkpoint` a folder that is no checkpoint",
        lambda f: distill_args(W(f), f / "D", "--resume_from_checkpoint", str(W(f) / "pruned")),
        phrase="checkpoint")
    add("distill", "a new run in OUT holding a run, without `--overwrite`", lambda f: distill_args(W(f), f / "run"),
        setup=_copy("run"), phrase="--resume_from_checkpoint latest")
    add("distill", "`--report_to nosuch`", lambda f: distill_args(W(f), f / "D", "--report_to", "nosuch"),
        phrase="tracker")
    add("distill", "two data sources", lambda f: distill_args(W(f), f / "D", "--train_data_dir", str(W(f) / "run")),
        phrase="one")
    add("distill", "`--teacher` that does not exist",
        lambda f: distill_args(W(f), f / "D", teacher=f / "nothing"), phrase="nothing")
    add("distill", "a FLUX plan for an SD3 teacher",
        lambda f: distill_args(W(f), f / "D", teacher="flux"), phrase="flux")
    add("distill", "an analysis of other weights of the same architecture (accepted, with a note)",
        lambda f: distill_args(W(f), f / "D", "--max_train_steps", "2", analysis=f / "analysis.json"),
        setup=_analysis_with(lambda d: d.update(fingerprint="0" * 24)), expect="ok", writes=("D",),
        check=lambda f: "measured on other weights" in (f / ".stdout").read_text() and (f / "D/model_index.json").is_file())
    add("distill", "an analysis of another architecture",
        lambda f: distill_args(W(f), f / "D", analysis=f / "analysis.json"),
        setup=_analysis_with(lambda d: d["transformer_config"].update(num_attention_heads=3)), phrase="architecture")

    # Files and folders that exist already, and configs that cannot be read.
    def _existing(name):
        def setup(folder):
            (folder / name).mkdir(parents=True)
            (folder / name / "keep.txt").write_text("mine\n")
        return setup
    add("quantize", "`--out` exists, no `--overwrite`", "quantize {ws}/pruned --out {case}/q", setup=_existing("q"),
        phrase="--overwrite")
    add("export", "`--out` exists, no `--overwrite`", "export {ws}/pruned --out {case}/x", setup=_existing("x"),
        phrase="--overwrite")
    add("analyze", "`--out` holds an analysis of other settings", "analyze sd3 --out {case}/a.json --n-prompts 3",
        setup=lambda f: shutil.copyfile(W(f) / "analysis.json", f / "a.json"), phrase="other settings")
    for what, content in [('`"pwp": "false"`', '{"format": "diffusers-hprune/config", "version": 1, "pwp": "false"}'),
                          ("an unknown field", '{"format": "diffusers-hprune/config", "version": 1, "colour": 3}'),
                          ("not JSON", "ratio = 0.3"),
                          ('`"learning_rate": NaN`', '{"format": "diffusers-hprune/config", "version": 1, '
                                                      '"learning_rate": NaN}')]:
        add("compress", f"`--config` with {what}", "compress sd3 --out {case}/c --config {case}/config.json",
            setup=(lambda c: lambda f: (f / "config.json").write_text(c))(content),
            phrase={"not JSON": "JSON", "an unknown field": "colour"}.get(what, "pwp" if "pwp" in what else
                                                                          "learning_rate"))
    add("compress", "non-UTF-8 `--config`", "compress sd3 --out {case}/c --config {ws}/latin1.txt", phrase="UTF-8")
    add("compress", "non-UTF-8 `--prompts`", "compress sd3 --out {case}/c --prompts {ws}/latin1.txt", phrase="UTF-8")
    add("evaluate", "a student that does not exist", "evaluate sd3 {case}/nothing --n 2", phrase="nothing")
    add("budget", "non-UTF-8 `--plan`", "budget sd3.5-large --plan {ws}/latin1.txt", phrase="UTF-8")
    add("convert-lora", "a LoRA file that does not exist", "convert-lora {case}/nothing.safetensors --to {case}/x "
        "--out {case}/l.safetensors", phrase="nothing")
    add("convert-lora", "a pickled LoRA", "convert-lora {case}/lora.bin --to {ws}/pruned --out {case}/l.safetensors",
        setup=lambda f: (f / "lora.bin").write_bytes(b"\x80\x04K\x01."), phrase="safetensors")

    # Weights that cannot be read.
    add("quantize", "truncated transformer weights", "quantize {case}/pruned --out {case}/q",
        setup=_chain(_copy("pruned"), _truncate("pruned/transformer/diffusion_pytorch_model.safetensors")),
        phrase="diffusion_pytorch_model.safetensors")

    def _pickled(folder):
        shutil.copytree(W(folder) / "pruned", folder / "pruned")
        t = folder / "pruned" / "transformer"
        (t / "diffusion_pytorch_model.safetensors").rename(t / "diffusion_pytorch_model.bin")
    for command, argv in [("quantize", "quantize {case}/pruned --out {case}/q"),
                          ("export", "export {case}/pruned --out {case}/x"),
                          ("evaluate", "evaluate {case}/pruned --n 2 --no-cost")]:
        add(command, "pickled `.bin` weights", argv, setup=_pickled, phrase="safetensors")
    add("inspect", "a folder that does not exist", "inspect {case}/nothing", phrase="nothing")
    add("export", "`--stock` on a plan with component removal", "export {ws}/pruned --stock --out {case}/x",
        phrase="components")
    for fmt, target in (("single-file", "x.safetensors"), ("gguf", "x.gguf")):
        add("export", f"`--format {fmt}` on a plan with component removal",
            f"export {{ws}}/pruned --format {fmt} --out {{case}}/{target}", phrase="--format remote")
        add("export", f"`--format {fmt}` with an `--out` of another suffix",
            f"export {{ws}}/blocks-pruned --format {fmt} --out {{case}}/x.bin", phrase="must end in")
        add("export", f"`--format {fmt}` with an `--out` that is a folder",
            f"export {{ws}}/blocks-pruned --format {fmt} --out {{case}}/{target}", setup=_existing(target),
            phrase="is a folder")
        add("export", f"`--format {fmt}` `--overwrite` of a file the project did not write",
            f"export {{ws}}/blocks-pruned --format {fmt} --out {{case}}/{target} --overwrite",
            setup=(lambda o: lambda f: (f / o).write_bytes(b"the user's file"))(target),
            phrase="not a file diffusers-hprune wrote")
    add("export", "`--quant` on a pipeline-folder export", "export {ws}/blocks-pruned --quant Q4_0 --out {case}/x",
        phrase="--quant applies to --format gguf only")
    add("push", "`--format gguf` without `--base-model`", "push {ws}/blocks-pruned --repo-id me/x --format gguf "
        "--token hf_x", phrase="needs --base-model")
    add("evaluate", "truncated student weights", "evaluate sd3 {case}/pruned --n 2 --no-cost",
        setup=_chain(_copy("pruned"), _truncate("pruned/transformer/diffusion_pytorch_model.safetensors")),
        phrase="damaged")
    add("quantize", "`--out` inside the model folder", "quantize {case}/pruned --out {case}/pruned/q",
        setup=_copy("pruned"), phrase="inside")
    add("quantize", "a folder that is no pipeline", "quantize {ws}/cache --out {case}/q", phrase="pipeline")
    _untrusted_cases(add)
    _issue_32_cases(add)
    return out


def _teacher_copy(edit=None):
    """``case/home/repo/pipe``: the SD3 toy as a downloaded folder, beside a secret (``case/home/token``) and a
    ``case/home/.ssh/authorized_keys`` that nothing may change; ``edit(pipe)`` damages it."""
    def setup(folder: Path):
        home = folder / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "authorized_keys").write_text("my key\n")
        (home / "token").write_text("hf_secret\n")
        shutil.copytree(W(folder) / "teacher", home / "repo" / "pipe")
        if edit:
            edit(home / "repo" / "pipe")
    return setup


def _index_edit(change):
    def edit(pipe: Path):
        index = json.loads((pipe / "model_index.json").read_text())
        change(index)
        (pipe / "model_index.json").write_text(json.dumps(index))
    return edit


def _config_edit(**fields):
    def edit(pipe: Path):
        config = json.loads((pipe / "transformer" / "config.json").read_text())
        (pipe / "transformer" / "config.json").write_text(json.dumps({**config, **fields}))
    return edit


def _untrusted_cases(add) -> None:
    """Issue 32: folders, names and files the user did not write; outputs that collide with inputs."""
    pipe = "{case}/home/repo/pipe"
    traversal = _teacher_copy(_index_edit(lambda i: i.update({"../../.ssh": ["diffusers", "AutoencoderKL"]})))
    for command, argv in [("quantize", f"quantize {pipe} --out {{case}}/home/q"),
                          ("export", f"export {pipe} --out {{case}}/home/x"),
                          ("evaluate", f"evaluate {pipe} --n 1 --no-cost")]:
        add(command, "a model_index.json key `../../.ssh` (a path out of the folder)", argv, setup=traversal,
            phrase="is not a plain name")
    link = _teacher_copy(lambda p: (p / "tokenizer" / "notes.txt").symlink_to(p.parent.parent / "token"))
    add("export", "a symbolic link to a secret outside the folder", f"export {pipe} --out {{case}}/home/x",
        setup=link, phrase="symbolic link")
    add("quantize", "a symbolic link to a secret outside the folder", f"quantize {pipe} --out {{case}}/home/q",
        setup=link, phrase="symbolic link")
    add("quantize", "`--overwrite` with an --out that holds the input", f"quantize {pipe} --out {{case}}/home "
        "--overwrite", setup=_teacher_copy(), phrase="holds MODEL")
    add("export", "`--overwrite` with an --out that holds the input", f"export {pipe} --out {{case}}/home/repo "
        "--overwrite", setup=_teacher_copy(), phrase="holds FOLDER")
    add("compress", "an --out that holds the model", f"compress {pipe} --out {{case}}/home --prompts "
        "{ws}/train.txt", setup=_teacher_copy(), phrase="holds MODEL")
    add("plan", "`--out` is the analysis", "plan {case}/analysis.json --ratio 0.3 --out {case}/analysis.json",
        setup=_copy("analysis.json"), phrase="same path as ANALYSIS")
    add("evaluate", "`--out` inside the model (its model_index.json)", f"evaluate {pipe} --n 1 --no-cost --out "
        f"{pipe}/model_index.json", setup=_teacher_copy(), phrase="inside MODEL")
    add("evaluate", "`--out` and `--grid` the same file", "evaluate sd3 --n 1 --no-cost --out {case}/g.png --grid "
        "{case}/g.png", phrase="same file")
    add("evaluate", "`--grid` without an image suffix", "evaluate sd3 --n 1 --no-cost --grid {case}/grid",
        phrase="must end in .png")
    add("budget", "a plan naming block 3 as \"3\" and \"03\"", "budget sd3 --plan {case}/plan.json",
        setup=_plan_with(removed_components={"3": ["ff"], "03": ["attn"]}), phrase="names block 3 twice")

    def duplicate_key(folder: Path):
        text = (W(folder) / "plan.json").read_text()
        data = json.loads(text)
        body = json.dumps({k: v for k, v in data.items() if k != "removed_blocks"})
        (folder / "plan.json").write_text(body[:-1] + ', "removed_blocks": [1], "removed_blocks": [2]}')
    add("budget", "a plan with a key given twice", "budget sd3 --plan {case}/plan.json", setup=duplicate_key,
        phrase="twice in one object")
    add("plan", "an analysis whose similarities are all NaN (KOALA)", "plan {case}/analysis.json --ratio 0.2 "
        "--strategy koala --out {case}/p.json",
        setup=_analysis_with(lambda d: d.update(similarity=[{"block": i, "cosine": float("nan")} for i in range(12)])),
        phrase="cosine must be a finite number")
    add("evaluate", "`/dev/zero` as the prompt file", "evaluate sd3 --prompts /dev/zero --no-cost",
        phrase="not a regular file")
    add("evaluate", "a 20,000-character prompt line", "evaluate sd3 --prompts {case}/long.txt --no-cost",
        setup=lambda f: (f / "long.txt").write_text("a red circle " * 1600 + "\n"), phrase="characters, more than")
    add("evaluate", "a free-form prompt on a toy (ShapeEval)", "evaluate sd3 --prompts {case}/free.txt --no-cost",
        setup=lambda f: (f / "free.txt").write_text("a photo of a cat\n"), phrase="not in the toy grammar")
    add("analyze", "a free-form prompt with --metric shapeeval", "analyze sd3 --metric shapeeval --prompts "
        "{case}/free.txt --out {case}/a.json", setup=lambda f: (f / "free.txt").write_text("a photo of a cat\n"),
        phrase="not in the toy grammar")
    for value in ("100000000", "12.5", "-5"):
        for command, argv in [("inspect", f"inspect {pipe}"), ("analyze", f"analyze {pipe} --out {{case}}/a.json "
                                                                          "--n-prompts 1")]:
            add(command, f"`num_layers` {value} in the transformer config", argv,
                setup=_teacher_copy(_config_edit(num_layers=json.loads(value))), phrase="num_layers must be an integer")
    flux_class = _teacher_copy(_index_edit(lambda i: i.update(_class_name="FluxPipeline")))
    no_vae = _teacher_copy(lambda p: shutil.rmtree(p / "vae"))
    for command, argv in [("quantize", f"quantize {pipe} --out {{case}}/home/q"),
                          ("export", f"export {pipe} --out {{case}}/home/x"),
                          ("evaluate", f"evaluate {pipe} --n 1 --no-cost")]:
        add(command, "a FLUX pipeline class around SD3 parts", argv, setup=flux_class, phrase="is not for its sd3")
        add(command, "a model_index.json naming a missing vae/", argv, setup=no_vae, phrase="names the component 'vae'")
    add("budget", "a copy of the SD3 toy's folder (no profile)", f"budget {pipe} --ratio 0.3", expect="ok",
        setup=_teacher_copy(), check=lambda f: "64x64" in (f / ".stdout").read_text())
    add("budget", "`--resolution` beyond what the SD3 toy draws", f"budget {pipe} --ratio 0.3 --resolution 512",
        setup=_teacher_copy(), phrase="draws at most 64x64 pixels")
    add("distill", "`--mixed_precision fp16` on a machine without a GPU",
        lambda f: distill_args(W(f), f / "o", "--mixed_precision", "fp16"), phrase="needs a CUDA GPU")

    # LoRAs that convert-lora cannot convert (a traceback each before).
    for what, lora, phrase in [
        ("a LoRA for a deeper model (block 12 of the 12-block toy)", {"blocks": [0, 12]}, "does not have"),
        ("a LoRA whose block has no index", {"names": ["transformer_blocks.x.attn.to_q"]}, "does not have"),
        ("adapter metadata that is not JSON", {"metadata": "{not json"}, "is not JSON"),
        ("adapter metadata that is a JSON list", {"metadata": "[1, 2]"}, "is a JSON list"),
        ("adapter metadata whose target_modules are not names", {"metadata": '{"target_modules": [1, null]}'},
         "not all names"),
        ("an SD3 text-modulation lora_B of 5 rows", {"rows": 5}, "6 chunks"),
    ]:
        rows = "rows" in lora  # the new last block's modulation is cut: an export without the original last block
        add("convert-lora", what, "convert-lora {case}/lora.safetensors --to "
            + ("{case}/stock" if rows else "{ws}/stock") + " --out {case}/l.safetensors",
            setup=_chain((lambda spec: lambda f: _write_lora(f / "lora.safetensors", **spec))(lora),
                         *([_stock_without_last_block] if rows else [])), phrase=phrase)
    for what, damage in [("a 0-byte", b""), ("an oversized-header", (2**62).to_bytes(8, "little") + b"{}")]:
        add("budget", f"{what} safetensors file in a copy of the toy", f"budget {pipe} --ratio 0.3",
            setup=_teacher_copy((lambda d: lambda p: next((p / "vae").glob("*.safetensors")).write_bytes(d))(damage)),
            phrase="is damaged")

    # Outputs that are, or hold, an input (every command that writes a file or a folder).
    add("plan", "`--out` the analysis it reads", "plan {case}/analysis.json --ratio 0.3 --out {case}/analysis.json",
        setup=_copy("analysis.json"))
    add("evaluate", "`--out` a file of the student folder",
        "evaluate sd3 {case}/pruned --n 2 --no-cost --out {case}/pruned/model_index.json", setup=_copy("pruned"))
    add("analyze", "`--out` a file of the model folder, `--overwrite`",
        "analyze {case}/pruned --out {case}/pruned/model_index.json --overwrite", setup=_copy("pruned"))
    add("convert-lora", "`--out` the LoRA it reads, `--overwrite`",
        "convert-lora {case}/lora.safetensors --to {ws}/stock --out {case}/lora.safetensors --overwrite",
        setup=lambda f: _write_lora(f / "lora.safetensors", blocks=[0, 1, 2, 3]))
    add("compress", "`--out` holding the model it compresses",
        "compress {case}/m/teacher --out {case}/m", setup=_copy("teacher", "m/teacher"))

    def linked_out(f: Path) -> None:  # --out is a link to a folder of the user's
        (f / "mine").mkdir()
        (f / "mine" / "keep.txt").write_text("the user's\n")
        (f / "out").symlink_to(f / "mine")

    def link_replaced(f: Path) -> bool:
        return (f / "mine" / "keep.txt").read_text() == "the user's\n" and (f / "out").is_dir() \
            and not (f / "out").is_symlink() and (f / "out" / "model_index.json").is_file()
    for command in ("quantize", "export"):
        add(command, "`--out` a symbolic link to a folder of the user's, `--overwrite` (the link is replaced, "
            "the folder it names untouched)", f"{command} {{ws}}/pruned --out {{case}}/out --overwrite",
            expect="ok", setup=linked_out, check=link_replaced, writes=("out",))

    # Faults: a full disk, SIGTERM while writing.
    for command, argv in [("quantize", "quantize {ws}/pruned --out {case}/small/q"),
                          ("export", "export {ws}/pruned --out {case}/small/x"),
                          ("convert-lora", "convert-lora {case}/lora.safetensors --to {ws}/stock "
                                           "--out {case}/small/l.safetensors")]:
        add(command, "a full disk under --out", argv, fault="disk full", phrase="no space left on the device holding",
            setup=(lambda f: _write_lora(f / "lora.safetensors", blocks=[0, 1, 2, 3], size=400_000))
            if command == "convert-lora" else None)
    add("distill", "a full disk under --output_dir", lambda f: distill_args(W(f), f / "small" / "o"),
        fault="disk full", phrase="no space left on the device holding")
    for command, argv in [("quantize", "quantize {ws}/pruned --out {case}/q"),
                          ("export", "export {ws}/pruned --out {case}/x"),
                          ("quantize", "quantize {ws}/pruned --out {case}/old --overwrite")]:
        add(command, "SIGTERM while writing" + (" over an old output (--overwrite)" if "old" in argv else ""), argv,
            fault="sigterm", expect="ok", setup=_copy("nf4", "old") if "old" in argv else None,
            writes=("old", "q", "x"))
    add("distill", "SIGTERM while writing a checkpoint or the final pipeline",
        lambda f: distill_args(W(f), f / "o", "--max_train_steps", "2", "--checkpointing_steps", "1"),
        fault="sigterm", expect="ok", writes=("o",), signal_on=r"\.checkpoint-2\.tmp|\.pipeline\..+")


def _issue_32_cases(add) -> None:
    """The rest of issue 32's list: what push, an export, a changed text encoder, prompt separators, a mistyped
    --overwrite and Diffusers-style library calls do with what a user or a download hands them."""
    pipe = "{case}/home/repo/pipe"
    offline = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}
    traversal = _teacher_copy(_index_edit(lambda i: i.update({"../../.ssh": ["diffusers", "AutoencoderKL"]})))
    link = _teacher_copy(lambda p: (p / "tokenizer" / "notes.txt").symlink_to(p.parent.parent / "token"))
    add("push", "a model_index.json key `../../.ssh` (a path out of the folder)", f"push {pipe} --repo-id me/model",
        setup=traversal, env=offline, phrase="is not a plain name")
    add("push", "a symbolic link to a secret outside the folder", f"push {pipe} --repo-id me/model", setup=link,
        env=offline, phrase="symbolic link")

    def evil(folder: Path) -> None:  # a pruned folder whose author added code, and auto_map entries naming it
        shutil.copytree(W(folder) / "blocks-pruned", folder / "evil")
        for name in ("pipeline.py", "transformer/modeling.py", "tokenizer/evil.py"):
            (folder / "evil" / name).write_text("import os\n")
        for component in ("transformer", "text_encoder", "vae"):
            config = folder / "evil" / component / "config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoModel": "evil.M"}}))

    def clean(folder: Path) -> bool:
        x = folder / "x"
        return not list(x.rglob("*.py")) and not any("auto_map" in json.loads(c.read_text())
                                                      for c in x.glob("*/config.json")) and (x / "model_index.json").is_file()
    add("export", "a folder with an author's `.py` files and `auto_map` entries (the stock export has neither)",
        "export {case}/evil --out {case}/x", setup=evil, expect="ok", writes=("x",), check=clean)
    for fmt, target in (("remote", "x"), ("stock", "x"), ("single-file", "x.safetensors"), ("gguf", "x.gguf")):
        add("export", f"`--format {fmt}` of a folder with truncated transformer weights",
            f"export {{case}}/blocks-pruned --format {fmt} --out {{case}}/{target}",
            setup=_chain(_copy("blocks-pruned"), _truncate("blocks-pruned/transformer/diffusion_pytorch_model.safetensors")),
            phrase="is damaged")
    add("quantize", "a truncated text encoder (copied as it is before)", "quantize {case}/pruned --out {case}/q",
        setup=_chain(_copy("pruned"), _truncate("pruned/text_encoder/model.safetensors")), phrase="is damaged")

    # Fingerprints: a changed text encoder is other weights.
    analyze_args = f"analyze {pipe} --metric velocity --n-prompts 2 --steps 4 --eval-steps 1 --height 32 --width 32 --out {{case}}/a.json"

    def analysed_then_changed(folder: Path) -> None:
        _teacher_copy()(folder)
        _cli(_fixed(analyze_args)(folder))
        _change_text_encoder(folder / "home/repo/pipe")
    add("analyze", "the same analysis again after the text encoder changed (its entries were reused)", analyze_args,
        setup=analysed_then_changed, phrase="components")

    def distilled_then_changed(folder: Path) -> None:
        _teacher_copy()(folder)
        _cli(distill_args(W(folder), folder / "d1", "--max_train_steps", "1", teacher=folder / "home/repo/pipe",
                          cache=folder / "cache"))
        _change_text_encoder(folder / "home/repo/pipe")
    add("distill", "a run after the text encoder changed (the teacher's training cache was reused)",
        lambda f: distill_args(W(f), f / "d2", "--max_train_steps", "1", teacher=f / "home/repo/pipe", cache=f / "cache"),
        setup=distilled_then_changed, expect="ok", writes=("d2", "cache"),
        check=lambda f: len([p for p in (f / "cache").iterdir() if not p.name.startswith(".")]) == 2
        and (f / "d2/model_index.json").is_file())

    # Prompt files: a form feed or U+2028 inside a line is part of the prompt (it split one prompt into three).
    for name, sep in (("a form feed", "\f"), ("U+2028", "\u2028")):
        add("evaluate", f"{name} inside a prompt line (one prompt, not in the toy grammar)",
            "evaluate sd3 --prompts {case}/p.txt --no-cost",
            setup=(lambda c: lambda f: (f / "p.txt").write_text(f"a red circle{c}a blue square\n"))(sep),
            phrase="not in the toy grammar")
    for command, argv in (("analyze", "analyze sd3 --prompts {case}/long.txt --out {case}/a.json"),
                          ("distill", None)):
        add(command, "a 20,000-character prompt line",
            argv or (lambda f: distill_args(W(f), f / "D", prompts=f / "long.txt")),
            setup=lambda f: (f / "long.txt").write_text("a red circle " * 1600 + "\n"), phrase="characters, more than")
    add("plan", "`/dev/zero` as the analysis", "plan /dev/zero --ratio 0.3 --out {case}/p.json",
        phrase="not a regular file")
    add("distill", "`/dev/zero` as `--prompts`", lambda f: distill_args(W(f), f / "D", prompts=Path("/dev/zero")),
        phrase="not a regular file")
    add("compress", "free-form prompts on a toy (a traceback after 6 minutes before)",
        "compress sd3 --out {case}/c --prompts {case}/free.txt",
        setup=lambda f: (f / "free.txt").write_text("a photo of a cat\na dog on a sofa\na bowl of fruit\n"),
        phrase="not in the toy grammar")
    for what, text, phrase in (("not JSON", "{not json", "is not valid JSON"),
                               ("a JSON list", "[1, 2]", "is not a pipeline index"),
                               ("a component that is not [library, class]", None, "must be [library, class]"),
                               ("no `_class_name`", None, "has no pipeline class")):
        def broken(pipe_dir: Path, text=text, what=what):
            index = json.loads((pipe_dir / "model_index.json").read_text())
            if what.startswith("a component"):
                index["vae"] = "AutoencoderKL"
            elif what.startswith("no "):
                index.pop("_class_name")
            (pipe_dir / "model_index.json").write_text(text if text is not None else json.dumps(index))
        add("evaluate", f"a model_index.json that is {what}" if text else f"a model_index.json with {what}",
            f"evaluate {pipe} --n 1 --no-cost", setup=_teacher_copy(broken), phrase=phrase)

    # What inspect says of a folder.
    add("inspect", "an NF4 folder (its own name, NF4 sizes)", "inspect {ws}/nf4", expect="ok",
        check=lambda f: (f / ".stdout").read_text().startswith(f"{W(f) / 'nf4'}:") and "MB@nf4" in (f / ".stdout").read_text())
    add("inspect", "a stock export (the original blocks, from its side file)", "inspect {ws}/stock", expect="ok",
        check=lambda f: "(12 blocks): removes blocks" in (f / ".stdout").read_text())

    # --overwrite on a folder of the user's (a mistyped --out): refused, nothing deleted.
    for command, argv, phrase in (("quantize", "quantize {ws}/pruned --out {case}/U --overwrite", "holds files that are not"),
                                  ("export", "export {ws}/blocks-pruned --out {case}/U --overwrite", "holds files that are not"),
                                  ("demo", "demo --out {case}/U --overwrite", "not an hprune run folder")):
        add(command, "`--overwrite` with an --out that holds the user's files (it was deleted)", argv,
            setup=_user_files, phrase=phrase)
    add("distill", "`--output_dir` that holds the teacher, `--overwrite`",
        lambda f: distill_args(W(f), f / "m", "--overwrite", teacher=f / "m" / "teacher"),
        setup=_copy("teacher", "m/teacher"), phrase="holds --teacher")

    # Library calls, as a Diffusers user makes them.
    add("library", "`save_pretrained(d)` then `.to(fp16).save_pretrained(d, variant='fp16')` (the fp32 weights were "
        "overwritten)", None, expect="ok", writes=("p",), call=_saved_with_variant)
    add("library", "`save_pretrained(d, max_shard_size='100KB')` (ignored by the pruned transformer)", None,
        expect="ok", writes=("p",), call=_saved_in_shards)
    for family in ("sd3", "flux"):
        add("library", f"a base-model LoRA loaded into a {family} stock export (FLUX: silently onto renumbered blocks)",
            None, call=(lambda fam: lambda f: _lora_into_stock_export(f, fam))(family), writes=("p", "stock"),
            phrase="hprune convert-lora")


def _cli(argv: list[str]) -> None:
    from diffusers_hprune.cli import main

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        if main(argv) != 0:
            raise SystemExit(f"a case's setup failed: hprune {' '.join(argv)}:\n{quiet.getvalue()}")


def _change_text_encoder(pipe_dir: Path) -> None:
    """Scale one tensor of the folder's first text encoder (as a fine-tuned encoder would differ)."""
    from safetensors.torch import load_file, save_file

    path = pipe_dir / "text_encoder" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.5 + 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})


def _pruned_toy():
    from diffusers_hprune import PrunePlan, toy
    from diffusers_hprune.pipelines.pruned import prune_pipeline

    return prune_pipeline(toy.load_pipeline("sd3"), PrunePlan(removed_blocks=[9], family="sd3", num_blocks=12))


def _first_dtype(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_slice(sorted(f.keys())[0]).get_dtype()


def _saved_with_variant(folder: Path) -> bool:
    import torch

    pipe, d = _pruned_toy(), folder / "p"
    pipe.save_pretrained(d)
    pipe.to(torch.float16).save_pretrained(d, variant="fp16")
    t = d / "transformer"
    return (_first_dtype(t / "diffusion_pytorch_model.safetensors") == "F32"
            and _first_dtype(t / "diffusion_pytorch_model.fp16.safetensors") == "F16")


def _saved_in_shards(folder: Path) -> bool:
    _pruned_toy().save_pretrained(folder / "p", max_shard_size="100KB")
    t = folder / "p" / "transformer"
    return (t / "diffusion_pytorch_model.safetensors.index.json").is_file() and len(list(t.glob("*.safetensors"))) > 1


def _lora_into_stock_export(folder: Path, family: str) -> bool:
    """Prune the toy's last block, export it stock, and load a LoRA made for the base model with an adapter in that
    block: the guard must refuse it, naming `hprune convert-lora`."""
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from diffusers_hprune import PrunePlan, toy
    from diffusers_hprune.hub.export import export_folder
    from diffusers_hprune.pipelines.pruned import prune_pipeline

    base = toy.load_pipeline(family)
    config = base.transformer.config
    single = family == "flux"
    n = config.num_layers + (config.num_single_layers if single else 0)
    prune_pipeline(base, PrunePlan(removed_blocks=[n - 1], family=family, num_blocks=n)).save_pretrained(folder / "p")
    export_folder(folder / "p", folder / "stock", format="stock")
    last = f"single_transformer_blocks.{config.num_single_layers - 1}" if single else f"transformer_blocks.{n - 1}"
    dim = config.num_attention_heads * config.attention_head_dim
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", f"{last}.attn.to_q"):
        tensors[f"transformer.{module}.lora_A.weight"] = torch.zeros(4, dim)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.zeros(dim, 4)
    save_file(tensors, str(folder / "lora.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(folder / "stock")
    pipe.load_lora_weights(str(folder / "lora.safetensors"))
    return True


def _stock_without_last_block(folder: Path) -> None:
    """``case/stock``: a stock export of the SD3 toy without its last block (its new last block is cut)."""
    from diffusers_hprune import PrunePlan, toy
    from diffusers_hprune.hub.export import export_folder
    from diffusers_hprune.pipelines.pruned import prune_pipeline

    pipe = toy.load_pipeline("sd3")
    n = pipe.transformer.config.num_layers
    prune_pipeline(pipe, PrunePlan(removed_blocks=[n - 1], family="sd3", num_blocks=n)).save_pretrained(folder / "p")
    export_folder(folder / "p", folder / "stock", format="stock")


def _write_lora(path: Path, *, blocks=(0,), names=(), metadata=None, rows=None, size=None) -> None:
    """A LoRA for the SD3 toy in Diffusers' format: ``to_q`` adapters of ``blocks`` (and of the module ``names``),
    ``metadata`` as its lora_adapter_metadata, ``rows``: block 10's text-modulation lora_B of that many rows; ``size``:
    pad with an adapter of about that many bytes."""
    import torch
    from safetensors.torch import save_file

    modules = [f"transformer_blocks.{i}.attn.to_q" for i in blocks] + list(names)
    tensors = {}
    for m in modules:
        tensors[f"transformer.{m}.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"transformer.{m}.lora_B.weight"] = torch.zeros(32, 4)
    if rows:
        tensors["transformer.transformer_blocks.10.norm1_context.linear.lora_B.weight"] = torch.zeros(rows, 4)
        tensors["transformer.transformer_blocks.10.norm1_context.linear.lora_A.weight"] = torch.zeros(4, 32)
    if size:
        tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = torch.zeros(size // 16, 4)
        tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata} if metadata else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="list the cases without running them")
    parser.add_argument("-k", action="append", help="only cases whose command or description contains this (given "
                        "several times: any of them)")
    parser.add_argument("--workspace", help="keep the workspace here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()

    selected = [c for c in cases() if not args.k or any(k in c.command or k in c.what for k in args.k)]
    if args.list:
        for c in selected:
            print(f"{c.command:<10} {c.expect:<6} {c.what}")
        print(f"{len(selected)} cases")
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from diffusers_hprune.cli import _quiet_libraries

    _quiet_libraries()
    root = Path(args.workspace or tempfile.mkdtemp(prefix="hprune-bad-inputs-"))
    ws = root / "workspace"
    started = time.perf_counter()
    if not (ws / "run" / "model_index.json").is_file():
        print(f"building the workspace in {ws} ...", flush=True)
        build_workspace(ws)
    results = []
    for n, case in enumerate(selected):
        folder = root / f"case-{n:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / "ws").symlink_to(ws)
        t0 = time.perf_counter()
        outcome, detail = run_case(case, ws, folder)
        results.append((case, outcome, detail))
        print(f"[{n + 1}/{len(selected)}] {case.command:<9} {outcome:<12} {time.perf_counter() - t0:5.1f}s  "
              f"{case.what}: {detail}", flush=True)
        _writable_again(folder)
        shutil.rmtree(folder, ignore_errors=True)

    by_command: dict[str, Counter] = {}
    for case, outcome, _ in results:
        by_command.setdefault(case.command, Counter())[outcome] += 1
    rows = [[command, sum(c.values()), *(c[o] for o in OUTCOMES)] for command, c in sorted(by_command.items())]
    totals = Counter()
    for c in by_command.values():
        totals.update(c)
    rows.append(["**all**", sum(totals.values()), *(totals[o] for o in OUTCOMES)])
    table = markdown_table(["command", "inputs tried", *OUTCOMES], rows)
    bad = [(c, o, d) for c, o, d in results if o not in ("clear error", "handled", "not run")]
    body = (f"Each bad input or fault run as `hprune ...` on real files (the SD3 toy, its analysis and plans, a "
            f"finished distillation, pruned and NF4 folders), {time.perf_counter() - started:.0f} s in all. "
            "Goal: no traceback, no wrong result, no file lost, nothing left behind by a fault.\n\n" + table + "\n")
    if bad:
        body += "\nNot yet right:\n\n" + "\n".join(f"- {c.command} {c.what}: {o} ({d})" for c, o, d in bad) + "\n"
    print()
    print(body)
    if not args.no_write and not args.k:
        update_section("bad-inputs", "Bad inputs: clear errors, no tracebacks, nothing lost", body)
    if not args.workspace:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
