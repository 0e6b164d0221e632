"""Issue 37: the adaptive analysis's plans against the calibration's own noise, on a toy's per-image evidence.

    python benchmarks/adaptive_noise.py [--families sd3-deep] [--orders 20] [--resamples 40] \
        [--settings 8:0.95:20,30,40 16:0.95:20,30,40 8:0.9:30 8:0.8:30]

``adaptive_replay.py`` compares one adaptive run (one batch order) with the full analysis of one calibration. Both
are draws: the adaptive run's first batches are one random order of the calibration, and the full analysis's dP
is the mean over one set of calibration images, whose per-image dP is heavy-tailed (a few images carry much of an
entry's dP). This script measures both draws on the evidence ``adaptive_replay.py`` keeps (every entry's dP on
every image), drawing nothing:

1. **Another calibration of the same size** (``--resamples``): the evidence's images drawn with replacement, the
   bootstrap (component images among the components' own first images, the others among the rest). The full
   analysis of each resample against the evidence: how often a full analysis of other images of the same number
   gives the same plan, and how far it is when it does not. Each setting of the adaptive rule is replayed on the
   same resamples: what a user with that other calibration would get from the adaptive analysis instead.
2. **Other batch orders** (``--orders``): each setting of the adaptive rule (``min images:confidence:ratios`` in
   percent, the ratios it decides for) replayed on the evidence's own images with the batches in the order of
   ``batch_order(batches, seed)`` for seeds ``0 .. orders - 1`` (the order an adaptive analysis whose calibration
   seed is ``seed`` takes): how often it gives the evidence's plan, how far it is, and what it costs.
3. **The oracle** of each ratio set: every entry stopped at the first batch after which its running dP, with every
   other entry at the evidence's dP, never changes a plan again: a rule that knows the answer. A rule that does not
   cannot expect to stop an entry before its running dP stays on the right side, so this is the floor of what
   per-entry stopping on running means spends with the same plans.

Distances: removals in one plan and not the other, and the damage the plan expects by the evidence's dP (sum of
``|Score|`` over its removals) relative to the evidence's plan (``analysis_cost.plan_difference``). Costs: block
evaluations on the toy and the real model's A100-hours under the paper's protocol (``analysis_cost``'s "same
intervals" reading; the oracle's entries read as stopped at their images). Section "adaptive-noise" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section  # noqa: E402
from adaptive_replay import costs, evidence, evidence_options, replay  # noqa: E402
from analysis_cost import ADAPTIVE_RATIOS, plan_difference  # noqa: E402

from diffusers_hprune.analysis.adaptive import batch_order  # noqa: E402
from diffusers_hprune.architecture import BLOCK  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer  # noqa: E402
from diffusers_hprune.contributions import ContributionReport  # noqa: E402
from diffusers_hprune.planning.decisions import PlanDecisions  # noqa: E402


def image_ids(report: ContributionReport, key, seed: int | None = None) -> list[int]:
    """The calibration image behind each of entry ``key``'s values, in the batch order of ``seed`` (default: the
    calibration's first seed, the order the adaptive analysis measured them in)."""
    size = int(report.calibration["batch_size"])
    seed = int(report.calibration["seeds"][0]) if seed is None else seed
    batches = [b for b in batch_order(-(-report.calibration_images // size), seed)
               if key[1] == BLOCK or b * size < report.component_images]
    return [i for b in batches for i in range(b * size, min((b + 1) * size, report.calibration_images))]


def values_by_image(report: ContributionReport, key) -> dict[int, float]:
    """Entry ``key``'s recorded values by the calibration image each was measured on."""
    return dict(zip(image_ids(report, key), report.entries[key]["values"], strict=True))


def reordered(evidence: ContributionReport, seed: int) -> ContributionReport:
    """The evidence with every entry's values in the batch order of ``seed``: what a replay takes them in."""
    out = copy.deepcopy(evidence)
    for key, entry in evidence.entries.items():
        value = values_by_image(evidence, key)
        out.entries[key] = dict(entry, values=[value[i] for i in image_ids(evidence, key, seed)])
    return out


def resampled(evidence: ContributionReport, seed: int) -> ContributionReport:
    """The evidence of another calibration of the same size, by the bootstrap: ``evidence``'s images drawn with
    replacement (``random.Random(seed)``; the component images among the first ``component_images``, the others
    among the rest). Calibration image ``j`` of the new one is the evidence's image ``drawn[j]``: each entry's values
    are the drawn images' dP in the evidence's batch order, its dP their mean. The drawn images are in ``run``."""
    rng = random.Random(seed)
    first, total = evidence.component_images, evidence.calibration_images
    drawn = [rng.randrange(first) for _ in range(first)] + [first + rng.randrange(total - first)
                                                            for _ in range(total - first)]
    out = copy.deepcopy(evidence)
    for key in evidence.entries:
        value = values_by_image(evidence, key)
        values = [value[drawn[j]] for j in image_ids(evidence, key)]
        delta = math.fsum(values) / len(values)
        out.entries[key] = {"score": evidence.baseline_score - delta, "delta": delta, "values": values}
    out.run = {"resample": {"seed": seed, "images": drawn}}
    return out


def resample(evidence: ContributionReport, seed: int) -> ContributionReport:
    """The full analysis of :func:`resampled`'s calibration: its dP, without the per-image values."""
    out = resampled(evidence, seed)
    out.entries = {key: {"score": e["score"], "delta": e["delta"]} for key, e in out.entries.items()}
    return out


def oracle(evidence: ContributionReport, ratios) -> ContributionReport:
    """Every entry stopped at the first whole batch after which its running dP (every other entry at the
    evidence's dP) gives the evidence's plans at ``ratios`` for good."""
    rule = PlanDecisions(inspect_transformer(evidence.transformer_config), ratios)
    truth = evidence.contributions()
    base, size = rule.plans(truth), int(evidence.calibration["batch_size"])
    out = copy.deepcopy(evidence)
    for key, entry in evidence.entries.items():
        values, stop = entry["values"], len(entry["values"])
        trial = dict(truth)
        for n in range(stop - size, 0, -size):  # from the last batch back: the earliest n from which it holds
            trial[key] = math.fsum(values[:n]) / n
            if rule.plans(trial) != base:
                break
            stop = n
        delta = math.fsum(values[:stop]) / stop
        out.entries[key] = {"score": evidence.baseline_score - delta, "delta": delta, "n_images": stop,
                            "values": values[:stop]}
    out.run = {"adaptive": {"min_images": size}}
    return out


def distances(evidence: ContributionReport, others: list[ContributionReport]) -> list[str]:
    """Per ratio of ADAPTIVE_RATIOS, over ``others``: how many give the evidence's plan, and the median removals that differ
    and expected damage."""
    cells = []
    for ratio in ADAPTIVE_RATIOS:
        got = [plan_difference(evidence, other, ratio) for other in others]
        same = sum(1 for differ, _, _ in got if not differ)
        cells.append(f"{same}/{len(got)}; {statistics.median(d for d, _, _ in got):g}, "
                     f"{statistics.median(b / a - 1 if differ else 0.0 for differ, a, b in got):+.1%}")
    return cells


def setting(text: str) -> tuple[int, float, tuple[float, ...]]:
    """``min images:confidence:ratios in percent`` (``8:0.95:20,30,40``)."""
    first, confidence, ratios = text.split(":")
    return int(first), float(confidence), tuple(int(r) / 100 for r in ratios.split(","))


def rows_of(family: str, args, folder: Path) -> list[list]:
    full = ContributionReport.load(evidence(family, args.n_prompts, args.batch_size, args.component_images, folder))
    calibrations = [resampled(full, seed) for seed in range(args.resamples)]
    rows = [[family, f"full analysis, another calibration ({args.resamples} bootstrap resamples)",
             *distances(full, calibrations), "-", "1.00x", "1.0x"]]
    print(" | ".join(rows[-1]), flush=True)
    for first, confidence, ratios in map(setting, args.settings):
        for where, sources in ((f"{args.orders} batch orders", [reordered(full, s) for s in range(args.orders)]),
                               ("another calibration", calibrations)):
            got = [replay(source, first, confidence, ratios) for source in sources]
            spent = [costs(full, g) for g in got]
            own = sum(1 for source, g in zip(sources, got) if not plan_difference(source, g, 0.3)[0])
            rows.append([family, f"adaptive, min {first}, confidence {confidence:g}, deciding {_percent(ratios)}: "
                         f"{where}", *distances(full, got), f"{own}/{len(got)}",
                         f"{statistics.median(s[0] for s in spent):.2f}x",
                         f"{statistics.median(s[2] for s in spent):.1f}x ({min(s[2] for s in spent):.1f}-"
                         f"{max(s[2] for s in spent):.1f}x; {statistics.median(s[1] for s in spent):.1f} h)"])
            print(" | ".join(rows[-1]), flush=True)
    for ratios in sorted({setting(s)[2] for s in args.settings}, key=len, reverse=True):
        best = oracle(full, ratios)
        toy, hours, real = costs(full, best)
        rows.append([family, f"oracle, deciding {_percent(ratios)}", *distances(full, [best]), "1/1", f"{toy:.2f}x",
                     f"{real:.1f}x ({hours:.1f} h)"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def _percent(ratios) -> str:
    return ", ".join(f"{r:.0%}" for r in ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evidence_options(parser)
    parser.add_argument("--orders", type=int, default=20, help="batch orders each setting is replayed in")
    parser.add_argument("--resamples", type=int, default=40, help="bootstrap resamples of the calibration")
    parser.add_argument("--settings", nargs="+", type=str,
                        default=["8:0.95:20,30,40", "16:0.95:20,30,40", "8:0.9:30", "8:0.8:30"],
                        help="min images:confidence:ratios in percent the rule decides for")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "analysis-cost"),
                        help="where the evidence is kept (adaptive_replay.py)")
    args = parser.parse_args(argv)
    rows = [row for family in args.families for row in rows_of(family, args, Path(args.out))]
    body = markdown_table(["toy", "analysis", *(f"{r:.0%}: same plan; median removals differ, damage" for r in ADAPTIVE_RATIOS),
                           "30%: its calibration's full plan", "fewer (toy)", "fewer, real model (range; A100-hours)"],
                          rows)
    body += (
        f"\n\nAgainst the evidence of adaptive-replay ({args.n_prompts} toy training prompts in batches of "
        f"{args.batch_size}, components on the first {args.component_images}: every entry's dP on every image), "
        "nothing drawn. Per ratio: how many analyses give the evidence's hierarchical plan; over all of them, the "
        "median number of removals in one plan and not the other and the median damage the plan expects by the "
        "evidence's dP (sum of abs(Score) over its removals, relative). *Another calibration*: the bootstrap, the "
        "calibration images drawn with replacement (components among their own first images), the same "
        f"{args.resamples} resamples in every row: the full analysis's row is the noise of the calibration itself; an "
        "adaptive row is the rule run on each resample, so it carries that noise and its own. *Batch orders*: the "
        "rule replayed on the evidence's own images, in the batch order an adaptive analysis of calibration seed 0 .. "
        f"{args.orders - 1} takes them. \"Its calibration's full plan\": how often the adaptive run gives the 30 % "
        "plan of the full analysis of the images it ran on. Costs are medians over the runs. *Oracle*: each entry "
        "stopped at the first batch after which its running dP (the others at the evidence's) keeps the evidence's "
        "plans at the ratios it decides for: the floor of per-entry stopping on running means with the same plans. "
        "Real model: SD3.5 Large Turbo / FLUX.1-schnell under the paper's protocol, analysis-cost-adaptive's "
        "\"same intervals\" reading.\n")
    update_section("adaptive-noise", "The adaptive analysis's plans against the calibration's own noise (issue 37)",
                   body)
    print(body)


if __name__ == "__main__":
    main()
