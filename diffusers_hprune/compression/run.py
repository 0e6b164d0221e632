"""``hprune compress``: the whole method in one command, one folder per stage, resumable.

    analysis -> plan -> pruned -> distilled -> quantized -> evaluation -> card (-> push)

Each stage writes ``OUT/<n>-<stage>/`` and, last, ``hprune_stage.json`` holding a key that hashes
the stage's inputs (its settings and the keys of the stages it reads). A second run skips every
stage whose key matches and redoes the others; an interrupted distillation continues from its
latest checkpoint, an interrupted analysis from its finished entries. The card is written into
the final model folder (``quantized``, else ``distilled``, else ``pruned``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers_hprune import toy
from diffusers_hprune.analysis.runner import analyze
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.compression.config import HPruneConfig
from diffusers_hprune.contributions import ContributionReport, components_fingerprint, fingerprint
from diffusers_hprune.distillation import trainer
from diffusers_hprune.distillation.data import held_out_prompts
from diffusers_hprune.distillation.settings import DistillConfig
from diffusers_hprune.evaluation.compare import (
    FIDELITY,
    evaluate_pipelines,
    load_for_evaluation,
    load_student_beside,
    overall_score,
    to_host,
)
from diffusers_hprune.hub.card import write_model_card
from diffusers_hprune.hub.push import push_folder
from diffusers_hprune.pipelines.pruned import prune_pipeline
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning.hpp import make_plan
from diffusers_hprune.quantization.folder import quantize_pipeline
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json

STAMP = "hprune_stage.json"
STARTED = "hprune_stage_started.json"  # written when a stage starts: what its partial work belongs to
RUN_CONFIG = "hprune_config.json"  # marks a compression run folder


class CompressError(HPruneError):
    """A compression run that cannot go on as asked."""


def holds_something_else(out: Path) -> bool:
    """``out`` is a file, or a non-empty folder that is not a compression run (no ``hprune_config.json``)."""
    return out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / RUN_CONFIG).is_file())


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _Stages:
    def __init__(self, out: Path, say: Callable[[str], None]):
        self.out, self.say = out, say
        self.rows: list[tuple[str, str, float]] = []

    def folder(self, number: int, name: str) -> Path:
        """Where stage ``number`` (``name``) writes: ``OUT/<number>-<name>``."""
        return self.out / f"{number}-{name}"

    def run(self, number: int, name: str, inputs: Any, work: Callable[[Path], None], keep_partial: bool = False):
        """Run ``work(folder)`` unless the stamp in ``folder`` matches ``inputs``; returns (folder, key).

        A stage started with other inputs (another key in ``hprune_stage_started.json``) starts again from
        an empty folder; with ``keep_partial`` an interrupted stage of the same key keeps what it wrote
        (its checkpoints or finished entries) and the stage's own code resumes from it.
        """
        folder = self.folder(number, name)
        key = _key(inputs)
        stamp, started = folder / STAMP, folder / STARTED
        if _stage_key(stamp) == key:
            self.rows.append((name, "done before (skipped)", 0.0))
            self.say(f"[{number}] {name}: done before, skipped")
            return folder, key
        resumed = keep_partial and _stage_key(started) == key
        if folder.exists() and not resumed:
            if _stage_key(started) is not None or _stage_key(stamp) is not None:
                self.say(f"[{number}] {name}: its settings changed; starting the stage again")
            shutil.rmtree(folder)
        stamp.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(started, {"stage": name, "key": key})
        self.say(f"[{number}] {name} ..." + (" (resuming)" if resumed else ""))
        start = time.perf_counter()
        work(folder)
        seconds = time.perf_counter() - start

        atomic_write_json(stamp, {"stage": name, "key": key, "seconds": round(seconds, 2)})
        self.rows.append((name, "resumed" if resumed else "ran", seconds))
        return folder, key


def _stage_key(path: Path) -> str | None:
    """The key in a stage's stamp file, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


class _Teacher:
    """The teacher pipeline, loaded when a stage needs it and released while distillation runs."""

    def __init__(self, model: str):
        self.model, self._pipe = model, None

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = load_for_evaluation(self.model)
        return self._pipe

    def park(self) -> None:
        """Every 16-bit module of the teacher back on the host (the analysis moved its transformer and VAE to the
        device): the stages between compute on the host or load their own models."""
        if self._pipe is not None:
            to_host(self._pipe)

    def release(self) -> None:
        import gc

        self._pipe = None
        gc.collect()


def compress(model: str, out: str | os.PathLike, config: HPruneConfig | None = None, *,
             prompts: list[str] | None = None, eval_prompts: list[str] | None = None, push: str | None = None,
             private: bool = False,
             license: str | None = None, progress: bool = True, say: Callable[[str], None] = print,
             cache_device: str | None = None, analysis_batch_size: int = 8) -> dict:
    """Compress ``model`` (a pipeline folder, cached Hub id, or toy name) into ``out``; returns the summary.

    ``prompts``: the data-free training prompts (default on the toys: their training prompts;
    required otherwise). ``eval_prompts``: the evaluation prompts; by default the toys' held-out
    prompts, or the last distinct lines of ``prompts``, held out of training (:func:`split_prompts`).
    Evaluation never sees a training prompt; ``summary.json`` says where its prompts came from.
    ``cache_device`` and ``analysis_batch_size``: where the analysis keeps its block-output cache and how many
    prompts it draws at once (memory, not the result: ``hprune compress --gpu-memory`` chooses them).
    """
    config = config or HPruneConfig()
    out = Path(out)
    if holds_something_else(out):
        raise CompressError(f"{out} exists and is not an hprune compress run folder; choose another --out "
                            "(nothing was written).")
    chosen = _Prompts.choose(model, config, prompts, eval_prompts)
    out.mkdir(parents=True, exist_ok=True)  # after every check of the inputs: a refusal writes nothing
    config.save(out / RUN_CONFIG)
    run = _Run(model, out, config, chosen, _Stages(out, say), _Teacher(model), progress, say,
               placement={"cache_device": cache_device, "batch_size": analysis_batch_size})
    run.analysis()
    run.plan()
    run.prune()
    if config.distill:
        run.distill()
    if config.quantize:
        run.quantize()
    metrics = run.evaluate()
    run.write_card(metrics, push, license)
    summary = {"model": str(model), "out": str(out), "final": str(run.final), "stages": run.stages.rows,
               "metrics": metrics["models"], **({"device": metrics["device"]} if "device" in metrics else {}),
               "prompts": {"training_distinct": len(set(chosen.train_pool)), "evaluation": len(chosen.evaluation),
                           "evaluation_source": chosen.eval_source}}
    if push:
        summary["pushed"] = push_folder(run.final, push, private=private)
    atomic_write_json(out / "summary.json", summary)
    say(format_summary(summary))
    return summary


@dataclass
class _Prompts:
    """The training and evaluation prompts of a run, which share no prompt, and where the evaluation ones came from."""

    training: list[str]
    evaluation: list[str]
    train_pool: list[str]
    eval_source: str

    @classmethod
    def choose(cls, model: str, config: HPruneConfig, prompts: list[str] | None,
               eval_prompts: list[str] | None) -> _Prompts:
        is_toy = str(model) in toy.NAMES
        if prompts is None and not is_toy:
            raise CompressError("Distillation needs training prompts: pass --prompts FILE (one prompt a line).")
        toy_split = {}
        if prompts is None:  # the toys' own training and held-out prompts
            toy_split = {"toy_train": toy.prompts(split="train"),
                         "toy_held_out": toy.prompts(split="heldout", n=config.eval_prompts, seed=config.seed)}
        train_pool, eval_pool, eval_source = split_prompts(prompts, eval_prompts, config.eval_prompts, **toy_split)
        training = [train_pool[k % len(train_pool)] for k in range(config.train_prompts)]
        evaluation = eval_pool[: config.eval_prompts]
        if is_toy:  # ShapeEval scores the evaluation prompts at the end: checked now, not after every stage
            toy.check_prompts(evaluation, eval_source)
        return cls(training, evaluation, train_pool, eval_source)


@dataclass
class _Run:
    """One compress run: each stage a method, in the order :func:`compress` calls them; each keys its result by
    the previous stage's key and its own settings (``_Stages.run``)."""

    model: str
    out: Path
    config: HPruneConfig
    prompts: _Prompts
    stages: _Stages
    teacher: _Teacher
    progress: bool
    say: Callable[[str], None]
    keys: dict[str, str] = field(default_factory=dict)
    final: Path | None = None
    unquantized: Path | None = None  # the 16-bit model the quantisation started from, evaluated beside it
    placement: dict = field(default_factory=dict)  # the analysis's cache_device and batch_size: same result

    @property
    def is_toy(self) -> bool:
        return str(self.model) in toy.NAMES

    @property
    def analysis_path(self) -> Path:
        return self.stages.folder(1, "analysis") / "analysis.json"

    @property
    def plan_path(self) -> Path:
        return self.stages.folder(2, "plan") / "plan.json"

    def analysis(self) -> None:
        config, pipe = self.config, self.teacher.pipe
        base = {"model": str(self.model), "teacher": fingerprint(pipe.transformer),
                "components": components_fingerprint(pipe)}
        # bk-sdm ranks by an alignment score of the final images: measured with the analysis when it is the strategy.
        alignment = "auto" if config.strategy == "bk-sdm" else None
        inputs = {**base, **config.analysis_settings(), **({"alignment": alignment} if alignment else {})}
        _, self.keys["analysis"] = self.stages.run(
            1, "analysis", inputs,
            lambda d: analyze(self.teacher.pipe, self.analysis_path, metric=config.metric,
                              n_prompts=config.analysis_prompts, eval_steps=config.eval_steps, seed=config.seed,
                              progress=self.progress, alignment_metric=alignment, vae_tiling=config.vae_tiling,
                              **self.placement),
            keep_partial=True)  # analyze resumes from its finished entries
        self.teacher.park()  # pruning copies the kept weights: on the host, not beside the teacher on the GPU

    def plan(self) -> None:
        config = self.config

        def do_plan(folder: Path) -> None:
            report = ContributionReport.load(self.analysis_path)
            outcome = make_plan(report.contributions(), inspect_transformer(self.teacher.pipe.transformer),
                                ratio=config.ratio, memory_bytes=config.memory, weight_dtype=config.weight_dtype,
                                alpha=config.alpha, r_thres=config.r_thres, strategy=config.strategy,
                                similarity=report.similarity or None, alignment=report.alignment_contributions(),
                                metadata={"source": "hprune compress", "analysis": str(self.analysis_path)})
            outcome.plan.save(self.plan_path)
            self.say(outcome.summary())

        inputs = {"analysis": self.keys["analysis"], **config.plan_settings()}
        _, self.keys["plan"] = self.stages.run(2, "plan", inputs, do_plan)

    def prune(self) -> None:
        plan = PrunePlan.load(self.plan_path)
        self.final, self.keys["model"] = self.stages.run(
            3, "pruned", {"plan": self.keys["plan"]},
            lambda folder: prune_pipeline(self.teacher.pipe, plan).save_pretrained(folder))

    def distill(self) -> None:
        prompt_file = self.out / "train_prompts.txt"
        distillation = self.config.distill_config(
            teacher=str(self.model), plan=str(self.plan_path), analysis=str(self.analysis_path),
            prompts=str(prompt_file), cache_dir=str(self.out / "data-cache"),
            output_dir=str(self.stages.folder(4, "distilled")), checkpoints_total_limit=2, resume_from_checkpoint="latest", progress=self.progress,
            keep_files=(STAMP, STARTED))

        def do_distill(folder: Path) -> None:
            prompt_file.write_text("\n".join(self.prompts.training) + "\n", encoding="utf-8")
            self.teacher.release()  # distill loads its own teacher: never two copies in memory
            trainer.distill(distillation)  # through the module: whatever trainer.distill is when the stage runs

        inputs = distill_stage_inputs(distillation, self.keys["plan"], self.prompts.training)
        self.final, self.keys["model"] = self.stages.run(4, "distilled", inputs, do_distill, keep_partial=True)

    def quantize(self) -> None:
        source = self.unquantized = self.final
        self.final, self.keys["model"] = self.stages.run(5, "quantized", {"from": self.keys["model"]},
                                                         lambda d: quantize_pipeline(source, d, overwrite=True))

    def evaluate(self) -> dict:
        config, final, unquantized = self.config, self.final, self.unquantized

        def do_evaluate(folder: Path) -> None:
            # loaded after the teacher's turn, around the teacher's text encoders and VAE (its own are the same files);
            # a quantised student after its 16-bit self, so each latency stands beside the same FLOP bound
            students = {"unquantized": lambda: load_student_beside(self.teacher.pipe, unquantized)} if unquantized else {}
            result = evaluate_pipelines(
                {"teacher": self.teacher.pipe, **students,
                 "student": lambda: load_student_beside(self.teacher.pipe, final)},
                self.prompts.evaluation, seed=config.seed,
                metrics=[FIDELITY] + (["shapeeval"] if self.is_toy else []), latency_repeats=config.latency_repeats,
                grid=folder / "grid.png", batch_size=config.eval_batch_size, vae_tiling=config.vae_tiling,
            )
            atomic_write_json(folder / "metrics.json", result)

        inputs = {"model": self.keys["model"], **config.evaluation_settings(), "prompts": _digest(self.prompts.evaluation),
                  "models": ["teacher", *(["unquantized"] if unquantized else []), "student"]}
        folder, _ = self.stages.run(6, "evaluation", inputs, do_evaluate)
        return json.loads((folder / "metrics.json").read_text())

    def write_card(self, metrics: dict, push: str | None, license: str | None) -> None:
        model, evaluation = self.model, self.stages.folder(6, "evaluation")
        commands = [f"hprune compress {model} --out {self.out} {_flags(self.config)}".strip()]
        name = f"toy-{model}" if self.is_toy else str(model).rstrip("/").split("/")[-1]
        base_model = f"the diffusers-hprune toy {str(model).upper()} pipeline" if self.is_toy else str(model)
        write_model_card(self.final, base_model=base_model, evaluation=metrics, grid=evaluation / "grid.png",
                         repo_id=push, license=license, commands=commands,
                         model_name=push.split("/")[-1] if push else f"{name}-hprune")


def distill_stage_inputs(distillation: DistillConfig, plan_key: str, train_prompts: list[str]) -> dict[str, Any]:
    """What the distillation stage's result depends on: the plan stage's key (which covers the teacher and the
    analysis), the training prompts' contents and every option that changes the trained weights."""
    return {"plan": plan_key, "prompts": _digest(train_prompts), **distillation.result_settings()}


def split_prompts(prompts: list[str] | None, eval_prompts: list[str] | None, n_eval: int, *,
                  toy_held_out: list[str] | None = None, toy_train: list[str] | None = None
                  ) -> tuple[list[str], list[str], str]:
    """Training and evaluation prompts that share no prompt, and where the evaluation prompts came from.

    ``eval_prompts`` given: they are used, and training keeps the other prompts (an evaluation
    prompt is never trained on). Otherwise, with the user's ``prompts``, the last ``n_eval``
    distinct ones are held out of training (at most a fifth of them, at least one). Without
    user prompts the toys' own split is used (``toy_train`` / ``toy_held_out``).
    """
    if prompts is None:
        train, held = list(toy_train or []), list(eval_prompts or toy_held_out or [])
        source = "--eval-prompts-file" if eval_prompts else "the toy's held-out prompts"
    elif eval_prompts:
        train, held, source = list(prompts), list(eval_prompts), "--eval-prompts-file"
    else:
        held = held_out_prompts(prompts, n_eval)
        if not held:
            raise CompressError("compress needs at least 2 distinct prompts in --prompts: some train the student, "
                                "the last ones are held out to evaluate it (or pass --eval-prompts-file FILE).")
        train, source = list(prompts), f"held out of --prompts: its last {len(held)} distinct lines, not trained on"
    kept = [p for p in train if p not in set(held)]
    if not kept:
        raise CompressError("Every training prompt is also an evaluation prompt; give --eval-prompts-file prompts that "
                            "are not in --prompts.")
    return kept, held, source


def _digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _flags(config: HPruneConfig) -> str:
    """The ``hprune compress`` flags that reproduce ``config`` (defaults left out)."""
    default = HPruneConfig()
    parts = []
    for name, value in config.to_dict().items():
        if name in ("format", "version") or value is None or getattr(default, name, value) == value:
            continue
        if name == "quantize":
            parts.append("--quantize " + ("nf4" if value else "none"))
        elif name == "distill":
            parts.append("--no-distill")
        elif isinstance(value, bool):
            parts.append(f"--{name.replace('_', '-')} {str(value).lower()}")
        else:
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)


def _speed_lines(models: dict, device: str | None) -> list[str]:
    """Each model's step latency as a share of the original's beside its FLOP bound, and where it was measured."""
    base = models.get("teacher", {})
    if not base.get("step_flops"):
        return []
    names = {"teacher": "original", "unquantized": "compressed, 16-bit", "student": "compressed"}
    lines = ["", f"{'step latency':<28}{'ms':>10}{'of original':>13}{'FLOP bound':>12}"]
    for name, m in models.items():
        if "latency_s" not in m:
            continue
        label = f"{names.get(name, name)} ({m.get('weights', '?')})"
        bound = m["step_flops"] / base["step_flops"] if m.get("step_flops") else float("nan")
        lines.append(f"{label:<28}{m['latency_s']['median'] * 1e3:>10.1f}"
                     f"{m['latency_s']['median'] / base['latency_s']['median']:>13.1%}{bound:>12.1%}")
    if device:
        lines.append(f"measured on {device}")
    return lines


def format_summary(summary: dict) -> str:
    lines = ["stage        status                  seconds"]
    lines += [f"{name:<12} {status:<23} {seconds:7.1f}" for name, status, seconds in summary["stages"]]
    t, s = summary["metrics"]["teacher"], summary["metrics"]["student"]
    lines.append("")
    lines.append(f"{'':<22}{'original':>16}{'compressed':>16}{'of original':>13}")
    if "params" in s:
        lines.append(f"{'parameters':<22}{t['params']:>16,}{s['params']:>16,}")
        lines.append(f"{'transformer bytes':<22}{t['weight_bytes']:>16,}{s['weight_bytes']:>16,}")
        lines.append(f"{'step latency (ms)':<22}{t['latency_s']['median'] * 1e3:>16.1f}"
                     f"{s['latency_s']['median'] * 1e3:>16.1f}")
    for metric, value in s["metrics"].items():
        tv, sv = overall_score(t["metrics"][metric]), overall_score(value)
        share = f"{sv / tv:>13.1%}" if tv > 0 else ""  # a higher-is-better score: the share kept
        lines.append(f"{metric:<22}{tv:>16.3f}{sv:>16.3f}{share}")
    if "fidelity" in s:
        lines.append(f"{'fidelity (PSNR dB)':<22}{'':>16}{s['fidelity']['psnr_db']:>16.2f}")
    lines += _speed_lines(summary["metrics"], summary.get("device"))
    lines.append("")
    lines.append(f"compressed pipeline: {summary['final']} (model card: {Path(summary['final']) / 'README.md'})")
    if summary.get("pushed"):
        lines.append(f"pushed: {summary['pushed']}")
    return "\n".join(lines)


__all__ = ["RUN_CONFIG", "CompressError", "compress", "format_summary", "holds_something_else", "split_prompts"]
