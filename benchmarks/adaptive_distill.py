"""Issue 37, item 3: where the adaptive analysis's plan differs from the full analysis's, the students each distils.

    python benchmarks/adaptive_distill.py [--families sd3-deep] [--ratio 0.3] [--seeds 0 1 2] [--steps 800] \
        [--threads 1]

For each toy, the full and the adaptive ``image_fidelity`` analyses that ``analysis_cost.py --adaptive`` measured
(``benchmarks/results/analysis-cost/<toy>-<n>x<batch>[-c<c>]-{full,adaptive}.json``) each give the hierarchical plan
at ``--ratio``. If the two plans remove the same blocks and components there is nothing to distil (the table says
so). Otherwise each plan is distilled as toy_ablation.py's "HPP + PWP + SGDistill" row (the same budget, data,
learning rate and scoring: ShapeEval on held-out prompts, PSNR against the teacher), SGDistill's sensitivities from
the plan's own analysis, once per seed; the verdict compares the two means with the seed spread (the larger sample
standard deviation of the two). ``--resamples N`` also distils the plans of N full analyses of other calibrations
of the same size (``adaptive_noise.resample``: bootstrap resamples of ``adaptive_replay.py``'s evidence), the
yardstick of how far a student moves when only the calibration images change. Rows are kept in
``benchmarks/results/toy-ablation/analysis-cost-<kind>/<toy>`` under their settings and the analysis file's digest,
so a run that stopped reuses what it finished. Section "adaptive-distill" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import toy_ablation as ablation  # noqa: E402
from _report import markdown_table, update_section  # noqa: E402
from adaptive_noise import resample  # noqa: E402
from analysis_cost import analysis_name  # noqa: E402

from diffusers_hprune import prune_pipeline  # noqa: E402
from diffusers_hprune.contributions import ContributionReport  # noqa: E402

HERE = Path(__file__).resolve().parent
KINDS = ("full", "adaptive")


def analyses(family: str, args) -> dict[str, Path]:
    """The analysis files whose plans are distilled: the full and the adaptive one, and ``--resamples`` full analyses
    of other calibrations of the same size (``adaptive_noise.resample`` of the evidence, written beside it once)."""
    folder = Path(args.analyses)
    name = analysis_name(family, args.n_prompts, args.batch_size, args.component_images)
    paths = {kind: folder / f"{name}-{kind}.json" for kind in KINDS}
    for path in paths.values():
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run benchmarks/analysis_cost.py --adaptive --families {family} first")
    evidence = folder / f"{name}-evidence.json"
    if args.resamples and not evidence.is_file():
        raise SystemExit(f"{evidence}: missing; run benchmarks/adaptive_replay.py --families {family} first")
    report = None
    for seed in range(args.resamples):
        paths[f"resample-{seed}"] = path = folder / f"{name}-resample-{seed}.json"
        if not path.is_file():
            report = report or ContributionReport.load(evidence)
            resample(report, seed).save(path)
    return paths


def fmt(values: list[float], digits: int = 3) -> str:
    """Mean ± sample standard deviation (the mean alone for one value)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def verdict(kind: str, means: dict[str, float], spreads: dict[str, float]) -> str:
    """Whether the student of ``kind``'s plan is within the seed spread (the larger sample standard deviation of
    the two) of the full plan's."""
    spread = max(spreads[kind], spreads["full"])
    gap = means[kind] - means["full"]
    return (f"{kind} minus full {gap:+.3f} against a seed spread of {spread:.3f}: "
            f"{'within' if abs(gap) <= spread else 'beyond'} it")


def run_family(family: str, args) -> tuple[list[list], list[str]]:
    lines, notes, means, spreads, plans = [], [], {}, {}, {}
    for kind, path in analyses(family, args).items():
        fam = ablation.Family(family, args, Path(args.out) / f"analysis-cost-{kind}", analysis=path)
        outcome, plan_path = fam.plan(args.ratio, "hierarchical")
        plans[kind] = (outcome.plan.removed_blocks, outcome.plan.removed_components)
        notes.append(f"- {family}, {kind} analysis: {outcome.ratio:.1%}: {outcome.plan.describe()}")
        if kind != "full" and plans[kind] == plans["full"]:
            notes.append(f"- {family}: the {kind} analysis's plan is the full analysis's; nothing to distil")
            continue
        key = ablation.row_key({"row": "hpp-alone", "plan": outcome.plan.to_dict(), "n_eval": args.n_eval})
        if fam.rows.get(key) is None:
            fam.rows.put(key, ablation.measure_pipeline(prune_pipeline(fam.teacher, outcome.plan), fam.prompts,
                                                        fam.teacher_images))
        untrained = fam.rows.get(key)["score"]["overall"]
        options = ablation.run_options(ablation.FULL, outcome.plan, outcome.ratio)
        runs = [fam.trained(f"{ablation.FULL} ({kind} analysis)", outcome.plan, plan_path, options, seed,
                            args.steps)[0] for seed in args.seeds]
        overall = [r["score"]["overall"] for r in runs]
        means[kind] = statistics.fmean(overall)
        spreads[kind] = statistics.stdev(overall) if len(overall) > 1 else 0.0
        teacher = fam.original()["score"]["overall"]
        lines.append([family, kind, f"{outcome.ratio:.1%}", f"{untrained:.3f}", len(runs), fmt(overall),
                      fmt([r["psnr"] for r in runs], 2) + " dB", fmt([r["ssim"] for r in runs]),
                      f"{means[kind] / teacher:.1%}"])
    notes += [f"- {family}: {verdict(kind, means, spreads)}" for kind in means if kind != "full"]
    return lines, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd3-deep"])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per row (the deep toys' table: 800)")
    parser.add_argument("--samples", type=int, default=400, help="teacher drawings to train on")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out prompts scored per row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-prompts", type=int, default=64, help="of the analyses (analysis_cost.py --adaptive)")
    parser.add_argument("--batch-size", type=int, default=8, help="of the analyses")
    parser.add_argument("--component-images", type=int, default=16, help="of the analyses")
    parser.add_argument("--resamples", type=int, default=0,
                        help="also distil the plans of this many full analyses of other calibrations of the same size "
                        "(bootstrap resamples of adaptive_replay.py's evidence: the calibration's own noise)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--analyses", default=str(HERE / "results" / "analysis-cost"))
    parser.add_argument("--out", default=str(HERE / "results" / "toy-ablation"))
    args = parser.parse_args(argv)
    args.metric, args.analysis_prompts = "image_fidelity", args.n_prompts  # what toy_ablation.Family reads
    if args.threads:
        torch.set_num_threads(args.threads)
    lines, notes = [], []
    for family in args.families:
        got = run_family(family, args)
        lines += got[0]
        notes += got[1]
    body = markdown_table(["toy", "plan from", "removed", "untrained ShapeEval", "seeds", "ShapeEval", "PSNR", "SSIM",
                           "of teacher"], lines)
    body += (
        f"\n\nHPP + PWP + SGDistill at {args.ratio:.0%} from each analysis of analysis-cost-adaptive ("
        f"{args.n_prompts} calibration prompts, components on the first {args.component_images}): "
        f"{args.steps} optimizer steps, batch {args.batch}, learning rate {args.lr}, {args.samples} teacher drawings, "
        f"seeds {', '.join(map(str, args.seeds))} (mean ± sample std); ShapeEval on {args.n_eval} held-out prompts, "
        "PSNR / SSIM against the teacher's images; untrained: the plan applied to the teacher, no training; "
        "SGDistill's sensitivities from the plan's own analysis. Issue 37 "
        "asks for the adaptive plan's student within the seed spread of the full plan's where the plans differ. "
        + (f"{'resample-0' if args.resamples == 1 else f'resample-0 .. {args.resamples - 1}'}: the full analysis "
           "of another calibration of the same size (a bootstrap resample of adaptive-replay's evidence, "
           "adaptive-noise), whose plan differs from the full "
           "analysis's by the calibration's own noise: how far a student moves when only the calibration images "
           "change. " if args.resamples else "")
        + "Plans and verdicts:\n\n" + "\n".join(notes) + "\n")
    update_section("adaptive-distill", f"Students of the full and the adaptive analysis's plans at {args.ratio:.0%} "
                   "(issue 37)", body)
    print(body)


if __name__ == "__main__":
    main()
