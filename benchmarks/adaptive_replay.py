"""Issue 37: the adaptive analysis's stopping rule replayed, setting by setting, on a toy's per-image evidence.

    python benchmarks/adaptive_replay.py [--families sd3-deep] [--n-prompts 64] [--component-images 16] \
        [--min-images 8 16 24] [--confidence 0.9 0.95 0.99]

An adaptive analysis decides from the per-image dP of the images it has measured. Once every entry's dP is known
for every image, in the order an adaptive analysis takes them, any setting of its rule can be run again without
drawing an image. So, per toy:

1. The evidence, once (kept in ``--out`` as ``<toy>-<n>x<batch>[-c<c>]-evidence.json``): ``hprune analyze --images
   auto --min-images <n>`` with ``analysis_cost.py --adaptive``'s calibration, which gives every entry every image
   and keeps each image's dP (as every adaptive analysis does). Its entries are the full analysis's (up to the
   order of a float sum). Interrupted, it resumes from its part files.
2. Each setting (``--min-images`` x ``--confidence``) replayed: the library's own ``AdaptiveRun`` and
   ``PlanDecisions`` (the hierarchical plans at 20, 30 and 40 %), whose measurement hands back the evidence's next
   batch of values instead of drawing it. The replay of the measured run's setting gives the entries the measured
   run gave (``analysis_cost.py --adaptive``'s file, where it exists; checked, and the table says so).

For each setting: the images it used, its block evaluations (modelled: ``analysis_cost.image_evaluations`` over the
toy's own config, the same count the full analysis gets), Spearman's rho and the plans at 20 / 30 / 40 % against the
full analysis (the evidence), and the extrapolation to SD3.5 Large Turbo / FLUX.1-schnell under the paper's protocol
(``analysis_cost``'s "same intervals" reading). Section "adaptive-replay" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, spearman, update_section  # noqa: E402
from analysis_cost import (  # noqa: E402
    ADAPTIVE_RATIOS,
    PAPER_A100_STEP_SECONDS,
    adaptive_counts,
    analysis_name,
    image_evaluations,
    matched_fractions,
    plan_agreement,
)

from diffusers_hprune.analysis.adaptive import AdaptiveRun  # noqa: E402
from diffusers_hprune.architecture import get_family  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer, load_transformer_config  # noqa: E402
from diffusers_hprune.contributions import AnalysisError, ContributionReport  # noqa: E402

REAL = {"sd3": "sd3.5-large-turbo", "flux": "flux.1-schnell"}


def evidence(family: str, n_prompts: int, batch_size: int, component_images: int | None, folder: Path) -> Path:
    """The analysis of ``family`` whose every entry has every image's dP (measured unless kept in ``folder``)."""
    from diffusers_hprune import toy
    from diffusers_hprune.analysis import analyze
    from diffusers_hprune.planning.decisions import PlanDecisions

    name = analysis_name(family, n_prompts, batch_size, component_images)
    out = folder / f"{name}-evidence.json"
    done = ContributionReport.load(out) if out.exists() else None
    if done is None or not done.complete:
        folder.mkdir(parents=True, exist_ok=True)
        analyze(family, out, n_prompts=n_prompts, batch_size=batch_size, component_images=component_images,
                min_images=n_prompts, stopping=PlanDecisions(inspect_transformer(toy.model_path(family)),
                                                             ADAPTIVE_RATIOS))
    return out


class Recorded:
    """A measurement that hands back an entry's next recorded values (what ``AdaptiveRun`` asks a drawing for)."""

    def __init__(self, evidence: ContributionReport, replay: ContributionReport):
        self.evidence, self.replay = evidence, replay
        self.size = int(evidence.calibration["batch_size"])

    def image_deltas(self, key, batch: int) -> list[float]:
        have = len(self.replay.entries[key]["values"]) if key in self.replay.entries else 0
        values = self.evidence.entries[key].get("values")
        if values is None or len(values) < self.replay.entry_images(key):
            raise AnalysisError(f"The evidence has no per-image dP of every image for block {key[0]} {key[1]}: "
                                "measure it again (remove the evidence file).")
        return values[have : have + self.size]


def replay(evidence: ContributionReport, min_images: int, confidence: float,
           ratios=ADAPTIVE_RATIOS) -> ContributionReport:
    """The adaptive analysis at ``min_images`` and ``confidence`` (hierarchical plans at ``ratios``), on the
    recorded values: the report it would have written."""
    from diffusers_hprune.planning.decisions import PlanDecisions

    report = copy.deepcopy(evidence)
    report.entries = {}
    recorded = Recorded(evidence, report)
    state = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    rule = PlanDecisions(inspect_transformer(evidence.transformer_config), ratios)
    run = AdaptiveRun(lambda: recorded, report, rule, min_images=min_images, confidence=confidence, state=state,
                      checkpoint=lambda: None, sync=lambda: None, progress=False)
    run.run(report.expected_keys())
    report.run = {"adaptive": run.summary()}
    return report


def same_stops(replayed: ContributionReport, measured: ContributionReport) -> bool:
    """Whether the replay stopped every entry where the measured run did, with the same dP."""
    return replayed.entries.keys() == measured.entries.keys() and all(
        replayed.images_of(k) == measured.images_of(k)
        and abs(replayed.entries[k]["delta"] - measured.entries[k]["delta"]) <= 1e-12 * max(1.0, abs(
            measured.entries[k]["delta"])) for k in measured.entries)


def toy_evaluations(report: ContributionReport) -> float:
    """Block evaluations of ``report``'s entries on their images (the model of ``analysis_cost``)."""
    steps = int(report.calibration["generation"]["num_inference_steps"])
    return image_evaluations(report.transformer_config, report.images_of, report.calibration_images, steps)


def costs(evidence: ContributionReport, got: ContributionReport) -> tuple[float, float, float]:
    """Of the replay ``got`` of ``evidence``: fewer block evaluations on the toy; the A100-hours of the real model of
    its family and how many times fewer than the full analysis, under the paper's protocol ("same intervals")."""
    real = REAL[evidence.family]
    config = load_transformer_config(real)
    counts = adaptive_counts(config, matched_fractions(got, int(evidence.calibration["batch_size"])),
                             int(got.run["adaptive"]["min_images"]))
    hours = counts["adaptive"] * PAPER_A100_STEP_SECONDS[real] / get_family(config).num_blocks(config) / 3600
    return toy_evaluations(evidence) / toy_evaluations(got), hours, counts["full"] / counts["adaptive"]


def evidence_options(parser: argparse.ArgumentParser) -> None:
    """The options that name a toy's evidence (this script's and ``adaptive_noise.py``'s)."""
    parser.add_argument("--families", nargs="+", default=["sd3-deep"])
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--component-images", type=int, default=16)


def rows_of(family: str, args, folder: Path) -> list[list]:
    full = ContributionReport.load(evidence(family, args.n_prompts, args.batch_size, args.component_images, folder))
    name = analysis_name(family, args.n_prompts, args.batch_size, args.component_images)
    measured_path = folder / f"{name}-adaptive.json"
    measured = ContributionReport.load(measured_path) if measured_path.exists() else None
    keys = sorted(full.entries)
    rows = []
    for first in args.min_images:
        for confidence in args.confidence:
            got = replay(full, first, confidence)
            check = ""
            if measured is not None and measured.run["adaptive"]["min_images"] == first and \
                    measured.run["adaptive"]["confidence"] == confidence:
                check = " (= measured)" if same_stops(got, measured) else " (differs from the measured run!)"
            toy, hours, fewer = costs(full, got)
            used = got.run["adaptive"]
            rows.append([family, first, f"{confidence:g}{check}", f"{used['images_used']:,} of {used['images_full']:,}",
                         f"{toy:.2f}x",
                         f"{spearman([full.entries[k]['delta'] for k in keys], [got.entries[k]['delta'] for k in keys]):+.3f}",
                         "; ".join(plan_agreement(full, got)), f"{hours:.1f} ({fewer:.1f}x)"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evidence_options(parser)
    parser.add_argument("--min-images", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--confidence", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "analysis-cost"),
                        help="where the evidence is kept (and analysis_cost.py --adaptive's files are read)")
    args = parser.parse_args(argv)
    rows = [row for family in args.families for row in rows_of(family, args, Path(args.out))]
    body = markdown_table(["toy", "min images", "confidence", "entry images", "fewer (toy)", "rho of dP",
                           "plans at 20 / 30 / 40 %", "A100-hours, real model (fewer)"], rows)
    body += (
        f"\n\nEvery row is the adaptive analysis's rule (`AdaptiveRun` with `PlanDecisions` at "
        f"{', '.join(f'{r:.0%}' for r in ADAPTIVE_RATIOS)}) run again on recorded per-image dP: the evidence, an "
        f"analysis of {args.n_prompts} toy training prompts in batches of {args.batch_size} (components: the first "
        f"{args.component_images}) that gave every entry every image. Nothing is drawn, so a row costs seconds. "
        "\"= measured\": the replay stopped every entry where the measured adaptive run (analysis-cost-adaptive) "
        "did, with its dP. Fewer (toy): block evaluations of the full analysis over the replay's, by "
        "`analysis_cost`'s model of an image's cost on the toy's config. Plans and rho against the evidence (the full "
        "analysis's dP), worded as in analysis-cost-adaptive. A100-hours: the real model of the toy's family under "
        "the paper's protocol, read as \"the same intervals\" (analysis-cost-adaptive), with the row's min images "
        "first.")
    if max(args.min_images) >= args.component_images:
        body += (f" A row whose min images reaches the component entries' {args.component_images} gives every component "
                 "entry all its images, which that reading counts as all of the paper's 80: its A100-hours overstate "
                 "what the setting would cost there.")
    body += "\n"
    update_section("adaptive-replay", "The adaptive analysis's settings, replayed on recorded per-image dP "
                   "(issue 37)", body)
    print(body)


if __name__ == "__main__":
    main()
