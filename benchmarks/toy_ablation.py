"""Issue 7, table 1/3 in kind: baselines and the method's ablation on the SD3 and FLUX toys.

    python benchmarks/toy_ablation.py [--families sd3 flux] [--ratios 0.2 0.3] [--seeds 0 1 2]
                                      [--steps 400] [--samples 400] [--n-eval 200]
    python benchmarks/toy_ablation.py --curve "HPP + PWP + SGDistill" --curve-steps 200 400 800 1600 3200
    python benchmarks/toy_ablation.py --sgdistill 0:1 0.1:1 0.3:1 0:0.1
    python benchmarks/toy_ablation.py --qlora 4 16 --ratios 0.3

For each toy and target ratio, from one analysis of the toy (the default metric, with ShapeEval's
whole-block dP as the alignment part that BK-SDM ranks by):

* Original (the teacher);
* BK-SDM (blocks by the ShapeEval drop), KOALA (by block input/output cosine) and last-blocks
  plans, each distilled (output + feature KD, no PWP, one learning rate);
* HPP alone (no training); HPP + KD (no PWP); HPP + PWP; HPP + PWP + SGDistill;
* + NF4: the HPP + PWP + SGDistill student quantised to NF4 (W4A16).

Every trained row gets the same budget: the same number of optimizer steps, the same data (the
teacher's drawings of training prompts, cached once per seed), learning rate and batch size. Each
trained row runs once per seed (the seed sets the data draw and the training noise); the table gives
the mean and the spread (sample standard deviation) over seeds. Columns: remaining parameters and
stored bytes (% of the original's fp32), ShapeEval overall and per category on held-out prompts,
fidelity to the teacher (PSNR and SSIM of the final images, same prompts and seeds) and the relative
degradation of ShapeEval against Original.

The table goes to the BENCHMARKS.md section of its ratios ("toy-ablation-30" for ``--ratios 0.3``, with
the plot ``benchmarks/toy_ablation_30.png``). Rows are kept in ``OUT/<family>/rows.json`` (``OUT``:
``benchmarks/results/toy-ablation``, where git keeps the rows, analyses and plans and ignores the runs) with the settings
and the torch thread count they ran with; a later run with the same settings reuses them, so ``--families sd3`` and ``--families flux`` can run side by side (one
thread each) and a final run with both families writes the whole table without training again.
Two rows whose plans and options coincide (e.g. KOALA choosing what BK-SDM chooses) are trained once.
Whole-block plans take the block set nearest the target ratio; the table gives every row's achieved
fraction ("removed").

``--curve LABEL`` trains one row (first ratio, every seed) at each of ``--curve-steps`` and writes its
learning curve (section "toy-ablation-curve-<toy>"): the budget at which doubling changes the row by less
than its seed spread is the converged budget. ``--sgdistill FLOOR:EPS_SCALE ...`` trains HPP + PWP +
SGDistill at each ``--sensitivity-floor`` and eps (a multiple of the default, the median |dP|) at the
first ratio and ``--steps`` (section "sgdistill-floor-<toy>"). ``--qlora RANK ...`` trains HPP + PWP + SGDistill as the
QLoRA student (``--teacher_4bit --lora_rank RANK``: adapters over the NF4 teacher's own weights) beside the same row
with full weights, at the first ratio and ``--steps``, each with its NF4 form (section "toy-ablation-qlora-<ratio>").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import depth_tag, markdown_table, update_section  # noqa: E402

from diffusers_hprune import prune_pipeline, toy  # noqa: E402
from diffusers_hprune.analysis import analyze  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer  # noqa: E402
from diffusers_hprune.contributions import ContributionReport  # noqa: E402
from diffusers_hprune.distillation.models import sgdistill_ratio  # noqa: E402
from diffusers_hprune.distillation.sgdistill import default_eps  # noqa: E402
from diffusers_hprune.distillation.trainer import DistillConfig, distill  # noqa: E402
from diffusers_hprune.evaluation import psnr, ssim  # noqa: E402
from diffusers_hprune.evaluation.measure import logical_params, stored_bytes  # noqa: E402
from diffusers_hprune.metrics import DEFAULT_METRIC  # noqa: E402
from diffusers_hprune.planning import make_plan  # noqa: E402
from diffusers_hprune.quantization import quantize  # noqa: E402
from diffusers_hprune.utils.fileio import atomic_path, atomic_write_json  # noqa: E402

KD = {"pwp": False, "sgdistill": False}
TRAINED = [  # label, strategy, distillation options
    ("BK-SDM + KD", "bk-sdm", KD),
    ("KOALA + KD", "koala", KD),
    ("last blocks + KD", "last", KD),
    ("HPP + KD (no PWP)", "hierarchical", KD),
    ("HPP + PWP", "hierarchical", {"sgdistill": False}),
    ("HPP + PWP + SGDistill", "hierarchical", {}),
]
FULL = "HPP + PWP + SGDistill"
NF4 = "HPP + PWP + SGDistill + NF4"


def resolved(options: dict) -> dict:
    """``options`` with SGDistill's default floor written out: a row keyed by it is measured again when the default
    changes, and a floor-study row at the default is the table's row."""
    if options.get("sgdistill", True) is False or "sensitivity_floor" in options:
        return options
    return dict(options, sensitivity_floor=DistillConfig.sensitivity_floor)


def run_options(label: str, plan, achieved: float) -> dict:
    """The distillation options of ``label``'s row for ``plan``. Below r_thres SGDistill is off (Algorithm 1), so
    the full method's run would be HPP + PWP's run again: it reuses that run (and quantises its student for NF4)."""
    options = {lbl: o for lbl, _, o in TRAINED}
    if label == FULL and sgdistill_ratio(plan, achieved)[0] < DistillConfig.r_thres:
        return options["HPP + PWP"]
    return options[label]


def row_key(settings: dict) -> str:
    """The cache key of a row: its ``settings`` and the torch thread count it runs with. The count changes the order
    of floating-point sums and so a training run's trajectory: a row measured with another count is measured again,
    never reported under this run's machine line."""
    return json.dumps(dict(settings, threads=torch.get_num_threads()), sort_keys=True)


class Rows:
    """Finished measurements of one family, kept atomically in ``rows.json`` under their settings key.

    Each new row is added to the file as it is then, not to this process's copy of it: two runs on the same toy
    (one ratio each, say) both keep their rows."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data = {**self._read(), key: value}
        atomic_write_json(self.path, self.data)


def measure_pipeline(pipe, prompts, teacher_images, images=None) -> dict:
    """Scores of ``pipe`` on ``prompts`` (``images``: its drawings, if already made), against ``teacher_images``."""
    images = toy.generate(pipe, prompts, seed=0) if images is None else images
    score = toy.shapeeval(images, prompts)
    return {
        "score": {k: score[k] for k in ("overall", *toy.CATEGORIES)},
        "psnr": None if teacher_images is None else psnr(images, teacher_images),
        "ssim": None if teacher_images is None else ssim(images, teacher_images),
        "params": logical_params(pipe.transformer),
        "bytes": stored_bytes(pipe.transformer),
    }


class Family:
    """One toy's teacher, held-out prompts and images, analysis and cached rows."""

    def __init__(self, family: str, args, out: Path, analysis: Path | None = None):
        """``analysis``: make the plans (and SGDistill's sensitivities) from this analysis file instead of the toy's
        own ``--analysis-prompts`` analysis; its rows are keyed by the file's digest too."""
        self.name, self.args = family, args
        self.digest = None if analysis is None else hashlib.sha256(Path(analysis).read_bytes()).hexdigest()[:16]
        self.folder = out / family
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows = Rows(self.folder / "rows.json")
        self.prompts = toy.prompts(split="heldout", n=args.n_eval, seed=0)
        self.teacher = toy.load_pipeline(family)
        self.teacher_images = toy.generate(self.teacher, self.prompts, seed=0)
        self.analysis_path = Path(analysis) if analysis is not None else (
            self.folder / f"analysis-{args.metric}-{args.analysis_prompts}.json")
        report = ContributionReport.load(self.analysis_path) if self.analysis_path.exists() else None
        if analysis is not None and (report is None or not report.complete):
            raise SystemExit(f"{analysis}: no complete analysis to make the plans from")
        if analysis is None and (report is None or not report.complete or report.alignment_contributions() is None):
            # Only when something is missing: rewriting the file would change its digest, which a resumed
            # distillation run checks against its checkpoint.
            report = analyze(self.teacher, self.analysis_path, metric=args.metric, alignment_metric="shapeeval",
                             n_prompts=args.analysis_prompts, eval_steps=4, progress=False)
        self.report = report
        self.inventory = inspect_transformer(self.teacher.transformer)
        train_prompts = toy.prompts(split="train")
        self.prompts_file = self.folder / "prompts.txt"
        self.prompts_file.write_text("\n".join(train_prompts[k % len(train_prompts)]
                                               for k in range(args.samples)) + "\n")

    def original(self) -> dict:
        key = row_key({"row": "original", "n_eval": self.args.n_eval})
        if self.rows.get(key) is None:
            self.rows.put(key, measure_pipeline(self.teacher, self.prompts, None, images=self.teacher_images))
        return self.rows.get(key)

    def plan(self, ratio: float, strategy: str):
        outcome = make_plan(self.report.contributions(), self.inventory, ratio=ratio, strategy=strategy,
                            similarity=self.report.similarity, alignment=self.report.alignment_contributions())
        path = self.folder / f"plan-{strategy}-{ratio:g}.json"
        outcome.plan.save(path)
        return outcome, path

    def trained(self, label: str, plan, plan_path: Path, options: dict, seed: int, steps: int,
                nf4: bool = False, extend: list[int] | None = None) -> tuple[dict, dict | None]:
        """The measured student of one trained row and seed (and its NF4 form), trained unless cached.

        ``extend``: the budgets of a learning curve; the run keeps a checkpoint at each and a longer
        budget resumes the shorter one's run (no learning-rate schedule: the same as a run from scratch).
        """
        args = self.args
        options = resolved(options)
        removal = {k: v for k, v in plan.to_dict().items() if k != "metadata"}  # not the strategy's name
        settings = {"plan": removal, "options": options, "seed": seed, "steps": steps, "samples": args.samples,
                    "lr": args.lr, "batch": args.batch, "n_eval": args.n_eval,
                    **({"analysis": self.digest} if self.digest else {})}
        key = row_key(settings)
        nf4_key = row_key(dict(settings, quantize="nf4"))
        tag = "-".join(f"{k}{v}" for k, v in sorted(options.items())) or "full"
        name = row_key(dict(settings, steps=None)) if extend else key
        run_dir = self.folder / "runs" / f"{hashlib.sha1(name.encode()).hexdigest()[:8]}-{tag}-s{seed}"
        if nf4 and self.rows.get(key) is not None and self.rows.get(nf4_key) is None and not extend \
                and (run_dir / "distill_summary.json").is_file():
            # Measured before without its NF4 form (e.g. by the floor study): quantise the saved student.
            self._put_nf4(nf4_key, toy.load_pipeline(run_dir))
        if self.rows.get(key) is None or (nf4 and self.rows.get(nf4_key) is None):
            resume = extend and any(run_dir.glob("checkpoint-*"))
            start = time.perf_counter()
            summary = distill(DistillConfig(
                teacher=self.name, plan=str(plan_path), analysis=str(self.analysis_path), output_dir=str(run_dir),
                prompts=str(self.prompts_file), cache_dir=str(self.folder / "cache"), max_train_steps=steps,
                learning_rate=args.lr, train_batch_size=args.batch, seed=seed,
                checkpointing_steps=math.gcd(*extend) if extend else 0, resume_from_checkpoint="latest" if resume
                else None, progress=False, overwrite=not resume, **options,
            ))
            if summary["steps"] != steps:
                raise SystemExit(f"{label} seed {seed} ran {summary['steps']} steps, not {steps}")
            student = toy.load_pipeline(run_dir)
            measured = measure_pipeline(student, self.prompts, self.teacher_images)
            measured.update(steps=summary["steps"], train_seconds=summary["seconds"],
                            trainable=summary["trainable_params"], wall=time.perf_counter() - start,
                            sgdistill=summary["sgdistill"])
            self.rows.put(key, measured)
            if nf4:
                self._put_nf4(nf4_key, student)
            print(f"{self.name} {label} seed {seed} {steps} steps: ShapeEval {measured['score']['overall']:.3f}, "
                  f"PSNR {measured['psnr']:.2f} dB ({measured['wall']:.0f} s)", flush=True)
        return self.rows.get(key), (self.rows.get(nf4_key) if nf4 else None)


    def _put_nf4(self, nf4_key: str, student) -> None:
        """Quantise ``student``'s transformer to NF4 and keep its measurement under ``nf4_key``."""
        student.transformer = quantize(student.transformer)
        self.rows.put(nf4_key, measure_pipeline(student, self.prompts, self.teacher_images))


def run_family(family: str, args, out: Path) -> dict:
    """Measure every row of ``family``; returns ``{"results": {(ratio, label): [measurement per seed]},
    "plans": {(ratio, strategy): description}}``."""
    fam = Family(family, args, out)
    results = {(None, "Original"): [fam.original()]}
    plans_text = {}
    for ratio in args.ratios:
        plans = {}
        for strategy in ("bk-sdm", "koala", "last", "hierarchical"):
            outcome, path = fam.plan(ratio, strategy)
            plans[strategy] = (outcome.plan, path, outcome.ratio)
            same = [other for other, (p, _, _) in plans.items() if other != strategy
                    and (p.removed_blocks, p.removed_components) == (outcome.plan.removed_blocks,
                                                                     outcome.plan.removed_components)]
            plans_text[(ratio, strategy)] = (f"{outcome.ratio:.1%}: {outcome.plan.describe()}"
                                             + (f" (the same as {', '.join(same)})" if same else ""))
        hpp_plan = plans["hierarchical"][0]
        key = row_key({"row": "hpp-alone", "plan": hpp_plan.to_dict(), "n_eval": args.n_eval})
        if fam.rows.get(key) is None:
            fam.rows.put(key, measure_pipeline(prune_pipeline(fam.teacher, hpp_plan), fam.prompts,
                                               fam.teacher_images))
        results[(ratio, "HPP alone (no training)")] = [fam.rows.get(key)]
        for label, _, _ in TRAINED:
            results[(ratio, label)] = []
            if label == FULL:
                results[(ratio, NF4)] = []
        for seed in args.seeds:  # every row of one seed before the next seed: a run cut off has whole seeds
            for label, strategy, _ in TRAINED:
                plan, plan_path, achieved = plans[strategy]
                measured, nf4 = fam.trained(label, plan, plan_path, run_options(label, plan, achieved), seed,
                                            args.steps, nf4=label == FULL)
                results[(ratio, label)].append(measured)
                if label == FULL:
                    results[(ratio, NF4)].append(nf4)
    return {"results": results, "plans": plans_text}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def identical_rows(results: dict) -> list[str]:
    """Trained rows whose every seed scored exactly what an earlier row scored (e.g. SGDistill below r_thres)."""
    order = [label for label, _, _ in TRAINED]

    def outcome(runs):
        return [(r["score"], r["psnr"], r["ssim"]) for r in runs]

    out = []
    for (ratio, label), runs in results.items():
        if label not in order:
            continue
        for earlier in order[: order.index(label)]:
            if outcome(results[(ratio, earlier)]) == outcome(runs):
                out.append(f"{ratio:.0%}: '{label}' scored exactly what '{earlier}' did, seed for seed")
                break
    return out


def relative_drop(base: float, scores: list[float]) -> float:
    """The degradation column: the relative drop of the mean of ``scores`` from ``base`` (nan for a teacher that
    scores 0: an untrained toy)."""
    return (base - statistics.fmean(scores)) / base if base else float("nan")


BASELINES = ("BK-SDM + KD", "KOALA + KD", "last blocks + KD")


def goal(results: dict) -> list[str]:
    """Issue 17's goal per ratio: the NF4 method row keeps >= 95 % of Original's ShapeEval and its degradation is at
    most a third of the best (least degraded) baseline's."""
    base = results[(None, "Original")][0]["score"]["overall"]

    def degradation(label, ratio):
        return relative_drop(base, [r["score"]["overall"] for r in results[(ratio, label)]])

    out = []
    for ratio in sorted({r for r, _ in results if r is not None}):
        if (ratio, NF4) not in results:
            continue
        ours = degradation(NF4, ratio)
        best = min(BASELINES, key=lambda label: degradation(label, ratio))
        theirs = degradation(best, ratio)
        kept = 1 - ours >= 0.95
        third = ours <= theirs / 3 if theirs > 0 else ours <= 0
        out.append(f"{ratio:.0%}: {NF4} keeps {1 - ours:.1%} of Original's ShapeEval (goal >= 95 %: "
                   f"{'met' if kept else 'not met'}); its degradation {ours:+.1%} against the best baseline's "
                   f"({best}, {theirs:+.1%}): {'at most' if third else 'more than'} a third (goal: "
                   f"{'met' if third else 'not met'})")
    return out


def table(family: str, measured: dict) -> tuple[str, list]:
    results = measured["results"]
    base = results[(None, "Original")][0]
    lines, plot = [], []
    for (ratio, label), runs in results.items():
        if not runs or any(r is None for r in runs):
            raise SystemExit(f"{family} {ratio} {label}: a row was not measured; re-run the script")
        overall = [r["score"]["overall"] for r in runs]
        cats = [f"{statistics.fmean(r['score'][c] for r in runs):.3f}" for c in toy.CATEGORIES]
        fidelity = ["-", "-"] if runs[0]["psnr"] is None else [
            _fmt([r["psnr"] for r in runs], 2) + " dB", _fmt([r["ssim"] for r in runs], 3)]
        degradation = relative_drop(base["score"]["overall"], overall)
        lines.append([family, "-" if ratio is None else f"{ratio:.0%}", label, len(runs),
                      f"{1 - runs[0]['params'] / base['params']:.1%}",
                      f"{runs[0]['params'] / base['params']:.1%}", f"{runs[0]['bytes'] / base['bytes']:.1%}",
                      _fmt(overall), *cats, *fidelity, f"{degradation:+.1%}", f"{1 - degradation:.1%}"])
        plot.append((ratio, label, *_mean_std(overall)))
    return lines, plot


def save_plot(plots: dict, base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, r) for f in plots for r in sorted({p[0] for p in plots[f] if p[0] is not None})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False, sharey=True)
    for ax, (family, ratio) in zip(axes[0], panels):
        entries = [p for p in plots[family] if p[0] == ratio]
        labels = [p[1] for p in entries]
        means = [p[2] for p in entries]
        errs = [p[3] or 0.0 for p in entries]
        colors = ["#bbbbbb" if "HPP" not in lab else "#1f77b4" for lab in labels]
        ax.bar(range(len(entries)), means, yerr=errs, color=colors, capsize=3)
        ax.axhline(base[family], color="k", linestyle="--", linewidth=1, label="Original")
        ax.set_xticks(range(len(entries)), labels, rotation=70, ha="right", fontsize=7)
        ax.set_title(f"{family} toy, {ratio:.0%} removed")
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("ShapeEval overall (mean ± std over seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def _row(label: str) -> tuple[str, dict]:
    for name, strategy, options in TRAINED:
        if name == label:
            return strategy, options
    raise SystemExit(f"--curve takes a trained row's label, one of: {', '.join(n for n, _, _ in TRAINED)}")


def learning_curve(args, out: Path) -> None:
    """One trained row at several budgets, every seed: is a budget long enough that doubling it changes nothing?

    Each toy gets its own section ("toy-ablation-curve-<toy>"), so a run on one toy keeps the other's."""
    strategy, options = _row(args.curve)
    ratio = args.ratios[0]
    for family in args.families:
        fam = Family(family, args, out)
        base = fam.original()["score"]["overall"]
        outcome, path = fam.plan(ratio, strategy)
        lines, points = [], []
        for steps in sorted(args.curve_steps):
            runs = [fam.trained(args.curve, outcome.plan, path, options, seed, steps, extend=args.curve_steps)[0]
                    for seed in args.seeds]
            overall = [r["score"]["overall"] for r in runs]
            mean, std = _mean_std(overall)
            points.append((steps, mean, std or 0.0))
            minutes = statistics.fmean(r["train_seconds"] for r in runs) / 60
            lines.append([family, steps, f"{minutes:.1f}", _fmt(overall), _fmt([r["psnr"] for r in runs], 2) + " dB",
                          f"{mean / base:.1%}"])
        body = (markdown_table(["toy", "steps", "train minutes", "ShapeEval", "PSNR", "of teacher"], lines)
                + f"\n\nRow: {args.curve} at {ratio:.0%}; seeds {', '.join(map(str, args.seeds))}; batch {args.batch}, "
                f"learning rate {args.lr}, {args.samples} teacher drawings; ShapeEval on {args.n_eval} held-out "
                f"prompts (mean ± sample std over seeds); plans from the {args.metric} analysis. Converged where "
                "doubling the budget changes the mean by no more than the seed spread:\n\n"
                + "\n".join(convergence(family, points)) + "\n")
        update_section(f"toy-ablation-curve-{family}",
                       f"Learning curve of '{args.curve}' on the {family} toy at {ratio:.0%} ({issue_of([family])})",
                       body)
        print(body)


def convergence(family: str, points: list[tuple[int, float, float]]) -> list[str]:
    """One line per doubling of the budget in ``points`` ((steps, mean, std) by steps): is the change of the mean
    within the seed spread (the larger of the two std)?"""
    notes = []
    for (s1, m1, d1), (s2, m2, d2) in zip(points, points[1:]):
        if s2 == 2 * s1:
            spread = max(d1, d2)
            notes.append(f"- {family}: {s1} -> {s2} steps changes the mean ShapeEval by {m2 - m1:+.3f} "
                         f"(seed spread {spread:.3f}): {'within' if abs(m2 - m1) <= spread else 'beyond'} it")
    return notes


def floor_study(args, out: Path) -> None:
    """HPP + PWP + SGDistill at several --sensitivity-floor / eps values, the same budget for each; one section per
    toy ("sgdistill-floor-<toy>")."""
    _, options = _row(FULL)
    ratio = args.ratios[0]
    for family in args.families:
        fam = Family(family, args, out)
        base = fam.original()["score"]["overall"]
        outcome, path = fam.plan(ratio, "hierarchical")
        median = default_eps([d for (i, c), d in fam.report.contributions().items() if c != "block"])
        lines = []
        for setting in args.sgdistill:
            floor, scale = (float(v) for v in setting.split(":"))
            opts = dict(options, sensitivity_floor=floor, **({"sensitivity_eps": median * scale}
                                                             if scale != 1.0 else {}))
            runs = [fam.trained(f"floor {floor} eps x{scale:g}", outcome.plan, path, opts, seed, args.steps)[0]
                    for seed in args.seeds]
            overall = [r["score"]["overall"] for r in runs]
            lines.append([family, f"{floor:g}", f"x{scale:g}", runs[0]["trainable"], _fmt(overall),
                          _fmt([r["psnr"] for r in runs], 2) + " dB", f"{statistics.fmean(overall) / base:.1%}"])
        body = (markdown_table(["toy", "sensitivity floor", "eps (x median \\|dP\\|)", "trainable params", "ShapeEval",
                                "PSNR", "of teacher"], lines)
                + f"\n\nHPP + PWP + SGDistill at {ratio:.0%}, {args.steps} steps, seeds "
                f"{', '.join(map(str, args.seeds))}, batch {args.batch}, learning rate {args.lr}; ShapeEval on "
                f"{args.n_eval} held-out prompts. A floor f gives m = 0 (no update) to every component whose "
                "multiplier m = (1 / (|dP| + eps)) / max falls below f.\n")
        update_section(f"sgdistill-floor-{family}",
                       f"SGDistill floor and eps on the {family} toy at {ratio:.0%} ({issue_of([family])})",
                       body)
        print(body)


def qlora_study(args, out: Path) -> None:
    """HPP + PWP + SGDistill with full weights and as the QLoRA student at each of ``args.qlora``'s ranks, the same
    budget for each, every seed, each with its NF4 form; one section for both toys ("toy-ablation-qlora-<ratio>")."""
    _, options = _row(FULL)
    ratio = args.ratios[0]
    rows = [("full weights", options)] + [(f"QLoRA, rank {r}", dict(options, teacher_4bit=True, lora_rank=r))
                                          for r in sorted(args.qlora)]
    lines, notes = [], []
    for family in args.families:
        fam = Family(family, args, out)
        base = fam.original()
        outcome, path = fam.plan(ratio, "hierarchical")
        full_mean = full_nf4 = None
        for label, opts in rows:
            pairs = [fam.trained(f"{FULL}, {label}", outcome.plan, path, opts, seed, args.steps, nf4=True)
                     for seed in args.seeds]
            runs, nf4 = [p[0] for p in pairs], [p[1] for p in pairs]
            overall, nf4_overall = [r["score"]["overall"] for r in runs], [r["score"]["overall"] for r in nf4]
            mean = statistics.fmean(overall)
            nf4_mean = statistics.fmean(nf4_overall)
            full_mean, full_nf4 = (mean, nf4_mean) if full_mean is None else (full_mean, full_nf4)
            teacher = base["score"]["overall"]
            adapters = f"{runs[0]['trainable'] / base['params']:.1%}" if opts.get("lora_rank") else "-"
            lines.append([family, label, f"{runs[0]['trainable']:,}", adapters, _fmt(overall),
                          _fmt([r["psnr"] for r in runs], 2) + " dB", f"{mean / teacher:.1%}",
                          f"{mean / full_mean:.1%}", _fmt(nf4_overall), _fmt([r["psnr"] for r in nf4], 2) + " dB",
                          f"{nf4_mean / teacher:.1%}", f"{nf4_mean / full_nf4:.1%}",
                          f"{nf4[0]['bytes'] / base['bytes']:.1%}",
                          f"{(nf4[0]['bytes'] + 2 * runs[0]['trainable']) / base['bytes']:.1%}"
                          if opts.get("lora_rank") else "-",
                          f"{statistics.fmean(r['wall'] for r in runs) / 60:.1f}"])
        notes.append(f"- {family} {ratio:.0%}: {outcome.plan.describe()}")
    header = ["toy", "student", "trainable params", "adapters (of teacher)", "ShapeEval", "PSNR", "of teacher",
              "of full weights", "NF4 ShapeEval", "NF4 PSNR", "NF4 of teacher", "NF4 of full weights", "NF4 bytes",
              "NF4 base + adapters bytes", "wall minutes"]
    body = (markdown_table(header, lines)
            + f"\n\nHPP + PWP + SGDistill at {ratio:.0%}; every row {args.steps} optimizer steps, batch {args.batch}, "
            f"learning rate {args.lr}, {args.samples} teacher drawings, seeds {', '.join(map(str, args.seeds))} "
            f"(mean ± sample std over seeds); ShapeEval on {args.n_eval} held-out prompts, PSNR against the teacher's "
            "images. QLoRA: `--teacher_4bit --lora_rank R` (the student's base is the NF4 teacher's own kept layers, "
            "only the adapters of the trainable components train); the saved student has the adapters merged into its "
            "weights (float32 here: the function the trained student computed). NF4: the saved student's transformer "
            "quantised to NF4 (W4A16). Of full weights: the row's mean as a share of the full-weight row's mean "
            "(NF4 columns: of the full-weight row's NF4 mean; issue 34's goal: the QLoRA student keeps >= 95 % of it). Bytes: "
            "of the teacher's fp32 transformer. NF4 base + adapters: the other way to publish a QLoRA student, its NF4 "
            "base as trained plus the adapters in bf16, which computes what the merged student computes (its "
            "ShapeEval is the merged row's): counted as the NF4 row's bytes plus 2 bytes per adapter parameter. Wall "
            "minutes: data, training, saving and scoring of one seed. Plans:\n\n" + "\n".join(notes) + "\n")
    name = f"toy-ablation-qlora-{depth_tag(args.families)}{round(ratio * 100):d}"
    update_section(name, f"The QLoRA student beside full-weight distillation on the {' and '.join(args.families)} "
                   f"toy{'s' if len(args.families) > 1 else ''} at {ratio:.0%} (issue 34)", body)
    print(body)


def issue_of(families) -> str:
    """The issue a study of ``families`` answers, for its section title: 36 for the deep toys, 17 for the others."""
    return "issue 36" if depth_tag(list(families)) else "issue 17"


def section_name(ratios: list[float], families: list[str] = ("sd3", "flux")) -> str:
    """The BENCHMARKS.md section (and plot) of a table at ``ratios``: one per set of ratios, so a run at 20 % keeps the
    30 % table ("toy-ablation-20", "toy-ablation-30", "toy-ablation-20-30"; the deep toys': "toy-ablation-deep-30")."""
    return "toy-ablation-" + depth_tag(list(families)) + "-".join(f"{round(r * 100):d}" for r in sorted(ratios))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=toy.NAMES)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400,
                        help="optimizer steps per trained row and seed (400: where both toys' learning curves are flat)")
    parser.add_argument("--samples", type=int, default=400, help="teacher drawings to train on")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out prompts scored per row")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="the analysis metric the plans are made from")
    parser.add_argument("--analysis-prompts", type=int, default=8, help="calibration prompts of the analysis")
    parser.add_argument("--curve", metavar="LABEL", help="learning curve of this trained row (first ratio) instead")
    parser.add_argument("--curve-steps", nargs="+", type=int, default=[200, 400, 800, 1600, 3200])
    parser.add_argument("--sgdistill", nargs="+", metavar="FLOOR:EPS_SCALE",
                        help="compare SGDistill settings instead (first ratio): floor and eps as a multiple of the "
                        "default eps (the median |dP|), e.g. 0.1:1")
    parser.add_argument("--qlora", nargs="+", type=int, metavar="RANK",
                        help="compare the QLoRA student at these LoRA ranks with full weights instead (first ratio)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "toy-ablation"),
                        help="where the analyses, plans and rows are kept (and, ignored by git, the runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    depth_tag(args.families)  # before any work
    if args.curve:
        return learning_curve(args, out)
    if args.sgdistill:
        return floor_study(args, out)
    if args.qlora:
        return qlora_study(args, out)
    measured = {family: run_family(family, args, out) for family in args.families}
    lines, plots, notes = [], {}, []
    for family, m in measured.items():
        rows, plots[family] = table(family, m)
        lines += rows
        notes += [f"- {family} {r:.0%} {s}: {text}" for (r, s), text in m["plans"].items()]
        notes += [f"- {family} {text}" for text in identical_rows(m["results"])]
        notes += [f"- {family} goal at {text}" for text in goal(m["results"])]
    header = ["toy", "target", "row", "seeds", "removed", "params", "bytes", "ShapeEval", *toy.CATEGORIES, "PSNR",
              "SSIM", "degradation", "of teacher"]
    name = section_name(args.ratios, args.families)
    plot_path = Path(__file__).resolve().parent / f"{name.replace('-', '_')}.png"
    save_plot(plots, {f: m["results"][(None, "Original")][0]["score"]["overall"] for f, m in measured.items()},
              plot_path)
    body = markdown_table(header, lines)
    body += (
        f"\n\nEvery trained row: {args.steps} optimizer steps, batch {args.batch}, learning rate {args.lr}, "
        f"{args.samples} teacher drawings of training prompts (drawn once per seed), loss L_KD + L_feat; seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± sample standard deviation over seeds. ShapeEval on "
        f"{args.n_eval} held-out prompts (one image each, seed = index; categories: means over seeds); PSNR / SSIM of the same images against "
        "the teacher's. Params and bytes: what the stored transformer holds, as a share of the original's "
        "(fp32; NF4 stores 4-bit weights plus their quantisation state). Degradation: relative drop of the mean "
        "ShapeEval from Original. Baselines are distilled without PWP, SGDistill or component removal, as in "
        "their papers. SGDistill's sensitivity-scaled learning rates apply from r_thres = 0.25 on (DESIGN.md "
        "section 6; Algorithm 1 compares the target ratio); below it the run is plain HPP + PWP. Removed: the "
        "achieved fraction of the transformer's parameters (whole-block plans take the block set nearest the target). "
        f"Of teacher: the row's mean ShapeEval as a share of Original's. Plans (from a {args.metric} analysis of each "
        f"toy, {args.analysis_prompts} calibration prompts, with ShapeEval's whole-block dP for BK-SDM) and rows that "
        "coincide:\n\n"
        + "\n".join(notes) + f"\n\n![toy ablation](benchmarks/{plot_path.name})\n"
    )
    ratios = " and ".join(f"{r:.0%}" for r in args.ratios)
    update_section(name, f"Baselines and ablation on the {' and '.join(args.families)} toy"
                   f"{'s' if len(args.families) > 1 else ''} at {ratios} "
                   + ("(issue 36)" if depth_tag(args.families) else "(issue 7, tables 1 and 3 in kind; issue 17)"),
                   body)
    print(body)


if __name__ == "__main__":
    main()
