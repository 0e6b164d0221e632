"""Cost of the contribution analysis on the toy models: block evaluations and wall time of three methods.

    python benchmarks/analysis_cost.py [--n-prompts 4] [--eval-steps 4] [--metrics velocity image_fidelity]

All methods measure the same dP (the script fails unless every entry is identical):
``scratch`` computes P(original) and P(ablated) from scratch for every entry (full model and
ablated model); ``naive`` computes the full model's outputs once and runs each whole ablated
model; ``cached`` runs the full model once, keeps every block's output and runs only the
ablated block and those after it.
Also counts the block evaluations of SD3.5 Large Turbo and FLUX.1-schnell from their configs and
extrapolates A100-hours for SD3.5 Large Turbo under the paper's protocol (400 images per block,
80 per sub-component, 4 steps), one block evaluation costing the paper's own A100 step latency
(Table 5: 444 ms for the original SD3.5 Large Turbo at 1024 px) divided by its 38 blocks.
Each metric's analysis (``velocity``: predictions at the compared steps; ``image_fidelity``: whole
trajectories and decoded images, the cache serving the first step) is timed per entry.

    python benchmarks/analysis_cost.py --adaptive --families sd3 flux sd3-deep flux-deep --n-prompts 64 \
        --component-images 16

measures instead the adaptive ``image_fidelity`` analysis (``hprune analyze --images auto``) against the full one
on each toy (issue 37): block evaluations, wall time, Spearman's rho of the two dP and the plans at 20, 30 and
40 %, and extrapolates both to SD3.5 Large Turbo and FLUX.1-schnell under the paper's protocol. Its analyses are
kept in ``--out``; an interrupted one resumes, its earlier runs' cost added (``earlier_cost``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _report import markdown_table, spearman, update_section

from diffusers_hprune.analysis import analyze
from diffusers_hprune.architecture import BLOCK, get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.contributions import ContributionReport, component_keys
from diffusers_hprune.utils.fileio import atomic_write_json


def analytic_counts(config) -> tuple[int, int, int]:
    """Block evaluations per recorded call (scratch, naive, cached), reference and baseline passes included."""
    family = get_family(config)
    n = family.num_blocks(config)
    scratch, naive, cached = n + n, n + n, n  # reference + baseline (cached: baseline from the cache)
    for i, c in component_keys(family, config):
        ablated = n - 1 if c == BLOCK else n
        scratch += n + ablated
        naive += ablated
        cached += n - i - 1 if c == BLOCK else n - i
    return scratch, naive, cached


# The paper's measured figures used for the extrapolation (HierarchicalPrune, Table 5 and Appendix C.1).
PAPER_A100_STEP_SECONDS = {"sd3.5-large-turbo": 0.444, "flux.1-schnell": 0.430}
PAPER_ANALYSIS_HOURS = {"sd3.5-large-turbo": 12.6, "flux.1-schnell": 27.1}
PAPER_PROTOCOL = {"block_images": 400, "component_images": 80, "steps": 4}


def protocol_evaluations(config, block_images: int, component_images: int, steps: int) -> dict[str, int]:
    """Block evaluations of a whole analysis (naive and cached) when whole-block entries use
    ``block_images`` images and sub-component entries ``component_images``, each image compared on
    ``steps`` denoising steps (one recorded call per image and step)."""
    family = get_family(config)
    n = family.num_blocks(config)
    block_calls, component_calls = block_images * steps, component_images * steps
    naive = cached = n * max(block_calls, component_calls)  # the full model's reference pass
    for i, c in component_keys(family, config):
        calls = block_calls if c == BLOCK else component_calls
        naive += calls * (n - 1 if c == BLOCK else n)
        cached += calls * (n - i - 1 if c == BLOCK else n - i)
    images = image_evaluations(config, lambda key: block_images if key[1] == BLOCK else component_images,
                               max(block_images, component_images), steps)
    return {"naive": naive, "cached": cached, "image_cached": images, "blocks": n}


def image_evaluations(config, images_of, drawn: int, steps: int) -> float:
    """Block evaluations of an ``image_fidelity`` analysis whose entry ``(i, c)`` is measured on ``images_of((i, c))``
    images of ``drawn`` calibration images, ``steps`` denoising steps each: the full model draws every calibration
    image once, then each ablated image's whole trajectory runs, the cache serving its first step (blocks before
    ``i`` replayed)."""
    family = get_family(config)
    n = family.num_blocks(config)
    images = n * drawn * steps  # the full model draws the calibration images
    for i, c in component_keys(family, config):
        kept = n - 1 if c == BLOCK else n
        images += images_of((i, c)) * ((n - i - 1 if c == BLOCK else n - i) + (steps - 1) * kept)
    return images


# -- the adaptive analysis (issue 37) -------------------------------------------------------------------------
ADAPTIVE_RATIOS = (0.2, 0.3, 0.4)


def entries_of(report, kind: str) -> list:
    """The report's whole-block entries (``kind`` ``"block"``) or its component entries (``"component"``)."""
    return [k for k in report.entries if (k[1] == BLOCK) == (kind == "block")]


def spent_fractions(report) -> dict[str, float]:
    """Of the images an adaptive analysis could add to its entries beyond their first ones, the share it added, for
    whole blocks and for components: ``sum(n - min) / sum(N - min)``."""
    first = int(report.run["adaptive"]["min_images"])
    out = {}
    for kind in ("block", "component"):
        keys = entries_of(report, kind)
        out[kind] = (sum(report.images_of(k) - first for k in keys) /
                     max(sum(report.entry_images(k) - first for k in keys), 1))
    return out


def matched_images(used: int, population: int, target: int, batch: int) -> int:
    """The images an entry needs on a calibration of ``target`` images to reach the interval it stopped at after
    ``used`` of ``population`` (the same per-image spread and distance to the cut): the half-width goes as
    ``sqrt((N - n) / ((N - 1) n))`` (finite-population correction), so the least whole batches ``n'`` with
    ``(T - n') / ((T - 1) n') <= (N - used) / ((N - 1) used)``, and ``target`` for an entry that took every image
    (its interval closed only because the population ran out)."""
    if used >= population:
        return target
    width = (population - used) / ((population - 1) * used)
    need = target / (1 + width * (target - 1))
    return min(target, max(batch, batch * math.ceil(need / batch - 1e-9)))


def matched_fractions(report, batch: int) -> dict[str, float]:
    """Like :func:`spent_fractions`, of the paper's protocol (400 images per block, 80 per component) when every
    entry needs the interval it stopped at on the toy (:func:`matched_images`)."""
    first = int(report.run["adaptive"]["min_images"])
    out = {}
    for kind, target in (("block", PAPER_PROTOCOL["block_images"]), ("component", PAPER_PROTOCOL["component_images"])):
        keys = entries_of(report, kind)
        need = [matched_images(report.images_of(k), report.entry_images(k), target, batch) for k in keys]
        out[kind] = sum(n - first for n in need) / max(len(keys) * (target - first), 1)
    return out


def adaptive_counts(config, fractions: dict[str, float], min_images: int = 8) -> dict[str, float]:
    """Block evaluations of the full ``image_fidelity`` analysis under the paper's protocol and of the adaptive one
    whose entries take ``min_images`` and then the ``fractions`` of the rest their kind is allowed (400 images
    per whole block, 80 per component, 4 steps)."""
    blocks, comps, steps = (PAPER_PROTOCOL[k] for k in ("block_images", "component_images", "steps"))

    def adaptive(key):
        most, kind = (blocks, "block") if key[1] == BLOCK else (comps, "component")
        return min_images + fractions[kind] * (most - min_images)

    return {"full": image_evaluations(config, lambda k: blocks if k[1] == BLOCK else comps, blocks, steps),
            "adaptive": image_evaluations(config, adaptive, blocks, steps)}


def plan_difference(full, other, ratio: float) -> tuple[int, float, float]:
    """How far ``other``'s hierarchical plan at ``ratio`` is from ``full``'s: the removals in one plan and not the
    other, and the damage each plan expects by ``full``'s dP (the sum of ``|Score|`` = ``|dP| / W_pos`` over its
    removals), ``full``'s plan's first. Plans with the same removals differ by 0."""
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.planning import make_plan, prunability

    inventory = inspect_transformer(full.transformer_config)
    plans = [make_plan(r.contributions(), inventory, ratio=ratio) for r in (full, other)]
    alpha = plans[0].plan.metadata["alpha"]
    damage = [-sum(prunability(full.entries[k]["delta"], k[0], full.num_blocks, alpha) for k in p.order)
              for p in plans]
    return len(set(plans[0].order) ^ set(plans[1].order)), damage[0], damage[1]


def plan_agreement(full, auto, ratios=ADAPTIVE_RATIOS) -> list[str]:
    """Per ratio: ``same`` when both analyses give the hierarchical plan the same removals, else the sum of
    ``|Score|`` (prunability by the full analysis's dP, ``|dP| / W_pos``: the damage the plan expects) of each
    plan's removals, the adaptive plan's first."""
    out = []
    for ratio in ratios:
        differ, full_damage, damage = plan_difference(full, auto, ratio)
        out.append(f"{ratio:.0%}: same" if not differ else
                   f"{ratio:.0%}: {differ} removals differ, sum of abs(Score) {damage:.5g} vs {full_damage:.5g} "
                   f"({damage / full_damage - 1:+.1%} damage expected)")
    return out


def earlier_cost(out: Path) -> dict:
    """What interrupted runs of the analysis ``out`` spent (block evaluations, seconds), for the run that resumes it
    to add to its own. Kept in ``<out>.cost.json``: each interrupted run's part file holds its own cost, added
    once when the next run starts (a part that has not changed since is not added again). A resumed run draws the
    full model's cache again: counted in both runs, as it was spent."""
    from diffusers_hprune.analysis.parts import parts_dir

    ledger_path = out.with_name(out.name + ".cost.json")
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {
        "block_evaluations": 0, "seconds": 0.0, "runs": 0, "last": None}
    part = parts_dir(out) / "rank-0.json"
    if part.exists():
        run = json.loads(part.read_text()).get("run", {})
        cost = [run.get("block_evaluations", 0), run.get("seconds", 0.0)]
        if cost[0] and cost != ledger["last"]:
            ledger.update(block_evaluations=ledger["block_evaluations"] + cost[0], seconds=ledger["seconds"] + cost[1],
                          runs=ledger["runs"] + 1, last=cost)
            atomic_write_json(ledger_path, ledger)
    return ledger


def analysis_name(family: str, n_prompts: int, batch_size: int, component_images: int | None) -> str:
    """The stem of a toy's analysis files in a results folder: ``{toy}-{prompts}x{batch}[-c{component images}]``."""
    return f"{family}-{n_prompts}x{batch_size}" + (f"-c{component_images}" if component_images else "")


def measure_adaptive(family: str, n_prompts: int, batch_size: int, folder: Path,
                     component_images: int | None = None) -> dict:
    """The full and the adaptive ``image_fidelity`` analysis of a toy (cached in ``folder``): costs and agreement."""
    from diffusers_hprune import toy
    from diffusers_hprune.architecture.inventory import inspect_transformer
    from diffusers_hprune.planning.decisions import PlanDecisions

    name = analysis_name(family, n_prompts, batch_size, component_images)
    cache = folder / f"{name}.json"
    if cache.exists():  # the plans compared again: cheap, and as this script words them now
        row = json.loads(cache.read_text())
        plans = plan_agreement(*(ContributionReport.load(folder / Path(row["runs"][k]["file"]).name)
                                 for k in ("full", "adaptive")))
        if plans != row["plans"]:
            atomic_write_json(cache, dict(row, plans=plans))
        return dict(row, plans=plans)
    folder.mkdir(parents=True, exist_ok=True)
    settings = dict(n_prompts=n_prompts, batch_size=batch_size, component_images=component_images)
    runs = {}
    for kind, extra in (("full", {}), ("adaptive", {"stopping": PlanDecisions(
            inspect_transformer(toy.model_path(family)), ADAPTIVE_RATIOS)})):
        out = folder / f"{name}-{kind}.json"
        earlier = earlier_cost(out)
        done = ContributionReport.load(out) if out.exists() else None
        if done is not None and done.complete and done.run.get("block_evaluations"):
            # finished by an earlier run of this script that stopped before its row: the cost is in the file
            seconds, evaluations, reused = done.run["seconds"], done.run["block_evaluations"], 0
        else:
            start = time.perf_counter()
            report = analyze(family, out, **settings, **extra)
            seconds, evaluations = time.perf_counter() - start, report.run["block_evaluations"]
            reused = report.run["this_process"].get("reused_entries", 0)
        runs[kind] = {"seconds": seconds + earlier["seconds"], "block_evaluations": evaluations +
                      earlier["block_evaluations"], "file": str(out), "reused_entries": reused,
                      "interrupted_runs": earlier["runs"]}
        if runs[kind]["reused_entries"] and not earlier["runs"]:
            print(f"{family} {kind}: resumed an earlier run ({runs[kind]['reused_entries']} entries reused): its cost "
                  f"is not the whole analysis's; remove {out} and its .parts folder to measure it again", flush=True)
        print(f"{family} {kind}: {runs[kind]['block_evaluations']:,} block evaluations, "
              f"{runs[kind]['seconds']:.0f} s", flush=True)
    full, auto = (ContributionReport.load(runs[k]["file"]) for k in ("full", "adaptive"))
    keys = sorted(full.entries)
    row = {"family": family, "blocks": full.num_blocks, "entries": len(keys), "n_prompts": n_prompts,
           "batch_size": batch_size, "component_images": component_images, "runs": runs, "adaptive": auto.run["adaptive"],
           "fractions": spent_fractions(auto),
           "rho": spearman([full.entries[k]["delta"] for k in keys], [auto.entries[k]["delta"] for k in keys]),
           "plans": plan_agreement(full, auto), "threads": torch.get_num_threads()}
    atomic_write_json(cache, row)
    return row


def adaptive_main(args) -> None:
    rows, table = [], []
    for family in args.families:
        row = measure_adaptive(family, args.n_prompts, args.batch_size, Path(args.out), args.component_images)
        rows.append(row)
        full, auto = row["runs"]["full"], row["runs"]["adaptive"]
        table.append([f"{family} ({row['blocks']} blocks)", row["entries"],
                      f"{row['adaptive']['images_used']:,} of {row['adaptive']['images_full']:,}",
                      f"{full['block_evaluations']:,} vs {auto['block_evaluations']:,}",
                      f"{full['block_evaluations'] / auto['block_evaluations']:.2f}x",
                      f"{full['seconds']:.0f} s vs {auto['seconds']:.0f} s", f"{full['seconds'] / auto['seconds']:.2f}x",
                      f"{row['rho']:+.3f}", "; ".join(row["plans"])])
    lines = []
    for name, like in (("sd3.5-large-turbo", "sd3"), ("flux.1-schnell", "flux")):
        measured = [r for r in rows if r["family"].startswith(like)]
        if not measured:
            continue
        source = max(measured, key=lambda r: r["blocks"])  # the deepest toy of the family: the nearest in depth
        config = load_transformer_config(name)
        per_block = PAPER_A100_STEP_SECONDS[name] / get_family(config).num_blocks(config)
        report = ContributionReport.load(Path(args.out) / Path(source["runs"]["adaptive"]["file"]).name)
        models = (("the same shares of the images beyond the first", source["fractions"]),
                  ("the same intervals", matched_fractions(report, args.batch_size)))
        for i, (assumption, fractions) in enumerate(models):
            counts = adaptive_counts(config, fractions)
            hours = {k: v * per_block / 3600 for k, v in counts.items()}
            lead = (f"- {name}: the full analysis {counts['full']:,.0f} block evaluations ({hours['full']:.1f} "
                    "A100-hours); the adaptive one, ") if i == 0 else "  "
            lines.append(
                f"{lead}{'with ' if i == 0 else 'or with '}{assumption} as on the {source['family']} toy (blocks "
                f"{fractions['block']:.1%}, components {fractions['component']:.1%} of the paper's images beyond "
                f"the first 8): {counts['adaptive']:,.0f} ({hours['adaptive']:.1f} A100-hours, "
                f"{counts['full'] / counts['adaptive']:.1f}x fewer){';' if i == 0 else '.'}")
    body = markdown_table(
        ["toy", "entries", "entry images (adaptive of full)", "block evaluations (full vs adaptive)", "fewer",
         "wall time", "faster", "rho of dP", "plans at 20 / 30 / 40 %"], table)
    body += (
        f"\n\nCalibration: {args.n_prompts} toy training prompts in batches of {args.batch_size}"
        f"{f' (components: the first {args.component_images})' if args.component_images else ''}; the adaptive "
        f"analysis gives each entry one batch, then decides for the hierarchical plans at "
        f"{', '.join(f'{r:.0%}' for r in ADAPTIVE_RATIOS)} (95 % intervals). Block evaluations count the ablated "
        "drawings and the cache, not the full model's drawing (the same for both); wall time counts everything. "
        "`rho`: Spearman's rank correlation of the two analyses' dP over every entry. A plan that differs is "
        "given with the sum of abs(Score) = |dP| / W_pos over its removals, by the full analysis's dP, the adaptive plan's "
        "first (lower: less damage expected).\n\n"
        "Extrapolated under the paper's protocol (400 images per whole-block entry, 80 per component, 4 steps, one "
        "block evaluation = the paper's A100 step (Table 5) over the blocks), from the deepest toy of each family, "
        "read two ways; neither is a measurement of the real model, which has 400 / 80 images where the toy has "
        f"{args.n_prompts} / {args.component_images or args.n_prompts}. *The same shares*: each entry takes the "
        "share of the images beyond its first 8 that the toy's entries of its kind took. *The same intervals*: each "
        "entry needs the interval it stopped at on the toy (the same per-image spread and distance to the cut); on a "
        "larger calibration that takes more images, because the finite-population correction that helps close "
        "the toy's intervals is weaker. An entry that took every toy image takes every image, and one decided at "
        "its first batch is counted with at least one more when the weaker correction asks for it.\n\n" + "\n".join(lines) + "\n")
    update_section("analysis-cost-adaptive", "Adaptive analysis: cost and agreement with the full one (issue 37)", body)
    print(body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--metrics", nargs="+", default=["velocity", "image_fidelity"])
    parser.add_argument("--adaptive", action="store_true",
                        help="measure the adaptive analysis against the full one instead (issue 37); --n-prompts "
                        "then defaults to 64")
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], help="toys of --adaptive")
    parser.add_argument("--batch-size", type=int, default=8, help="of --adaptive")
    parser.add_argument("--component-images", type=int, help="of --adaptive: images per component entry (default all)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "analysis-cost"),
                        help="where --adaptive keeps its analyses (tracked by git; partial ones are not)")
    args = parser.parse_args(argv)
    if args.adaptive:
        if "--n-prompts" not in (argv if argv is not None else sys.argv):
            args.n_prompts = 64
        adaptive_main(args)
        return
    rows = []
    for family in ("sd3", "flux"):
        for metric in args.metrics:
            results = {}
            methods = ("scratch", "naive", "cached") if metric == "velocity" else ("naive", "cached")
            for method in methods:
                start = time.perf_counter()
                report = analyze(family, metric=metric, n_prompts=args.n_prompts, eval_steps=args.eval_steps,
                                 method=method, progress=False)
                results[method] = (report, time.perf_counter() - start)
                print(f"{family} {metric} {method}: {report.run['block_evaluations']} block evaluations, "
                      f"{results[method][1]:.1f} s", flush=True)
            cached, t_cached = results["cached"]
            for method in methods[:-1]:
                if results[method][0].entries != cached.entries:
                    raise SystemExit(f"{family} {metric}: the cached analysis differs from the {method} one; not "
                                     "reporting numbers")
            e_cached = cached.run["block_evaluations"]
            for method in methods[:-1]:
                report, seconds = results[method]
                e = report.run["block_evaluations"]
                rows.append([f"{family} toy ({cached.num_blocks} blocks)", metric, len(cached.entries),
                             f"{method} vs cached", f"{e} vs {e_cached}", f"{e / e_cached:.2f}x",
                             f"{seconds:.1f} s vs {t_cached:.1f} s", f"{seconds / t_cached:.2f}x",
                             f"{t_cached / len(cached.entries):.2f} s", "identical"])
    analytic = []
    for name in ("sd3.5-large-turbo", "flux.1-schnell"):
        config = load_transformer_config(name)
        scratch, naive, cached = analytic_counts(config)
        fam = get_family(config)
        analytic.append(f"{name} ({fam.num_blocks(config)} blocks, {len(component_keys(fam, config))} entries): "
                        f"{scratch:,} scratch, {naive:,} naive, {cached:,} cached ({scratch / cached:.2f}x and "
                        f"{naive / cached:.2f}x fewer)")
    name = "sd3.5-large-turbo"
    counts = protocol_evaluations(load_transformer_config(name), **PAPER_PROTOCOL)
    per_block = PAPER_A100_STEP_SECONDS[name] / counts["blocks"]
    hours = {m: counts[m] * per_block / 3600 for m in ("naive", "cached", "image_cached")}
    extrapolation = (
        f"Extrapolated to {name} under the paper's protocol ({PAPER_PROTOCOL['block_images']} images per whole-block "
        f"entry, {PAPER_PROTOCOL['component_images']} per sub-component entry, {PAPER_PROTOCOL['steps']} steps each): "
        f"{counts['naive']:,} block evaluations naive, {counts['cached']:,} cached. At "
        f"{per_block * 1e3:.1f} ms per block evaluation (the paper's A100 step, "
        f"{PAPER_A100_STEP_SECONDS[name] * 1e3:.0f} ms, over {counts['blocks']} blocks) that is "
        f"**{hours['naive']:.1f} A100-hours naive and {hours['cached']:.1f} A100-hours cached**, against the "
        f"paper's {PAPER_ANALYSIS_HOURS[name]} A100-hours. The naive figure is "
        f"{hours['naive'] / PAPER_ANALYSIS_HOURS[name] - 1:+.0%} off the paper's, which ran every ablated model "
        "whole, so the calibration is of the right size; the cached figure is what `hprune analyze --metric velocity` "
        f"would take. With `image_fidelity` (the default: every image's whole {PAPER_PROTOCOL['steps']}-step "
        f"trajectory, the cache serving its first step) it is {counts['image_cached']:,} block evaluations, "
        f"**{hours['image_cached']:.1f} A100-hours**, plus one VAE decode per image. Not counted: text encoding "
        "(once per prompt, shared by every entry) and the decodes. Not measured on an A100: no GPU here."
    )
    print(extrapolation, flush=True)
    body = markdown_table(
        ["model", "metric", "entries", "comparison", "block evaluations", "fewer evals", "wall time", "faster",
         "cached per entry", "dP"], rows)
    body += (
        f"\n\nCalibration: {args.n_prompts} toy training prompts, {args.eval_steps} denoising steps compared "
        f"(velocity; image_fidelity draws every step), {torch.get_num_threads()} threads. Counts include the full model's reference pass; wall "
        "time includes drawing the calibration images once (the same for every method).\n\n"
        "Per recorded call, counted from the configs: " + "; ".join(analytic) + ".\n\n"
        "Against `naive` (the full model's outputs computed once, every ablated model run whole) replaying the "
        "blocks before the ablated one saves less than 2x in block evaluations: an ablation of block i runs "
        "|B| - i blocks instead of |B|, about half on average when the entries are spread evenly over the depth "
        "(SD3: 2|B| / (|B| + 1)), less when the early blocks hold more entries, as FLUX's double-stream blocks "
        "(6 entries) do next to its single-stream blocks (4). Against `scratch` (each dP "
        "computed from scratch, as a metric function called on the full and the ablated model would) it is about "
        "4x. Wall time also counts rebuilding every ablated model (naive, scratch) and drawing the calibration "
        "images (all).\n\n" + extrapolation + "\n"
    )
    update_section("analysis-cost", "Analysis cost: scratch, naive and cached (issues 4 and 7)", body)
    print(body)


if __name__ == "__main__":
    main()
