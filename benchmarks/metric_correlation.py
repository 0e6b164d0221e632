"""Which contribution metric predicts the damage of removing a block? (issue 17)

    python benchmarks/metric_correlation.py [--families sd3 flux] [--n-heldout 200] [--n-calibration 8]

For each toy:

1. The measured damage: every block skipped in turn (``removed_blocks=[i]``) draws the same
   ``--n-heldout`` held-out prompts with the same seeds as the full model; damage is the final
   images' PSNR against the full model's (lower = more damage) and the ShapeEval drop.
2. The analyses ``hprune analyze`` offers, on the calibration set it uses by default (training
   prompts, disjoint from the held-out ones): ``velocity`` (the velocity prediction at
   ``--eval-steps`` steps, cached), ``image_fidelity`` (the final images of the whole few-step
   trajectory against the full model's) and ``shapeeval`` (prompt adherence of the final images).
   Their wall time per entry goes beside each other.
3. The Spearman rank correlation between each metric's dP(block) and each damage measure
   (PSNR loss counted as ``-PSNR`` so that both increase with damage), and between the block's
   position (its index in execution order: FLUX's double blocks, then its single blocks) and the
   damage: negative where later blocks matter less, HierarchicalPrune's premise.

The 12-block toys go to the section "metric-correlation", the deep toys (``--families sd3-deep
flux-deep``) to "metric-correlation-deep".

Results are kept in ``OUT/<family>/`` (``sweep.json``, the blocks swept so far in ``sweep-partial-<n>.json`` so that
an interrupted sweep resumes, ``analysis-<metric>.json``, and the cost of the run that
computed an analysis in ``cost-<metric>-<n>.json``: a later run reusing every entry costs nothing) and reused by a
later run with the same settings; the table goes to BENCHMARKS.md, section "metric-correlation".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import depth_tag, markdown_table, spearman, update_section  # noqa: E402

from diffusers_hprune import PrunePlan, get_family, prune_pipeline, toy  # noqa: E402
from diffusers_hprune.evaluation import psnr  # noqa: E402
from diffusers_hprune.utils.fileio import atomic_write_json  # noqa: E402

METRICS = ("velocity", "image_fidelity", "shapeeval")


def position_rho(damage: dict) -> tuple[float, float]:
    """Spearman's rho of block position against skip damage: ``(vs PSNR loss, vs ShapeEval drop)``."""
    blocks = damage["blocks"]
    position = [b["block"] for b in blocks]
    return (spearman(position, [-b["psnr"] for b in blocks]),
            spearman(position, [damage["full_shapeeval"] - b["shapeeval"] for b in blocks]))


def section(families) -> tuple[str, str]:
    """The BENCHMARKS.md section (name, title) of a run over ``families``: the deep toys have their own."""
    if depth_tag(families):
        return "metric-correlation-deep", "Which contribution metric predicts a block's damage: the deep toys (issue 36)"
    return "metric-correlation", "Which contribution metric predicts a block's damage (issue 17)"


def sweep(family: str, n: int, folder: Path) -> dict:
    """Skip-one-block damage over ``n`` held-out prompts (cached in ``folder/sweep.json``). The blocks measured so
    far are kept in ``folder/sweep-partial-<n>.json`` after each block, so an interrupted sweep resumes there (the
    full model's images are drawn again: the same prompts and seeds give the same images)."""
    path = folder / "sweep.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("n") == n:
            return data
    from tqdm.auto import tqdm

    partial_path = folder / f"sweep-partial-{n}.json"
    partial = json.loads(partial_path.read_text()) if partial_path.exists() else {"blocks": [], "seconds": 0.0}
    pipe = toy.load_pipeline(family)
    fam = get_family(pipe.transformer)
    n_blocks = fam.num_blocks(pipe.transformer.config)
    prompts = toy.prompts("heldout", n=n, seed=0)
    start = time.perf_counter() - partial["seconds"]
    full_images = toy.generate(pipe, prompts, seed=0)
    full = toy.shapeeval(full_images, prompts)["overall"]
    blocks = partial["blocks"]
    folder.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(blocks), n_blocks), desc=f"{family}: skip block", initial=len(blocks), total=n_blocks):
        ablated = prune_pipeline(pipe, PrunePlan(removed_blocks=[i], family=fam.name, num_blocks=n_blocks))
        images = toy.generate(ablated, prompts, seed=0)
        blocks.append({"block": i, "shapeeval": toy.shapeeval(images, prompts)["overall"],
                       "psnr": psnr(images, full_images)})
        atomic_write_json(partial_path, {"blocks": blocks, "seconds": round(time.perf_counter() - start, 1)})
    data = {"n": n, "full_shapeeval": full, "blocks": blocks, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(path, data)
    partial_path.unlink()
    return data


def analysis(family: str, metric: str, n_prompts: int, eval_steps: int, folder: Path):
    """The toy's analysis with ``metric`` (resumed from ``folder`` when there), and the cost of the run(s) that
    computed it: ``{"seconds", "computed_entries", "resumed"}`` from ``folder/cost-<metric>-<n>.json``, written when a
    run computes entries (a later run reusing every entry costs nothing and leaves it), or None when not recorded."""
    from diffusers_hprune.analysis import analyze

    path = folder / f"analysis-{metric}-{n_prompts}.json"
    cost_path = folder / f"cost-{metric}-{n_prompts}.json"
    report = analyze(family, path, metric=metric, n_prompts=n_prompts, eval_steps=eval_steps, progress=True,
                     overwrite=True)
    run = report.run.get("this_process", report.run)
    if run.get("computed_entries"):
        atomic_write_json(cost_path, {"seconds": run["seconds"], "computed_entries": run["computed_entries"],
                                      "resumed": bool(run.get("reused_entries"))})
    return report, (json.loads(cost_path.read_text()) if cost_path.exists() else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["sd3", "flux"], choices=toy.NAMES)
    parser.add_argument("--n-heldout", type=int, default=200)
    parser.add_argument("--n-calibration", type=int, default=8, help="calibration prompts of every analysis")
    parser.add_argument("--eval-steps", type=int, default=4, help="steps the velocity metric compares")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    parser.add_argument("--sweep-only", action="store_true", help="measure (and cache) the damage sweep only")
    parser.add_argument("--out", default="build/metric-study")
    args = parser.parse_args(argv)
    out = Path(args.out)
    name, title = section(args.families)  # before any work
    rows, cost_rows, notes, position_rows = [], [], [], []
    for family in args.families:
        folder = out / family
        damage = sweep(family, args.n_heldout, folder)
        if args.sweep_only:
            continue
        rho_psnr, rho_shape = position_rho(damage)
        position_rows.append([family, len(damage["blocks"]), f"{damage['full_shapeeval']:.3f}", f"{rho_psnr:+.2f}",
                              f"{rho_shape:+.2f}"])
        psnr_loss = [-b["psnr"] for b in damage["blocks"]]
        shape_drop = [damage["full_shapeeval"] - b["shapeeval"] for b in damage["blocks"]]
        n_blocks = len(damage["blocks"])
        for metric in args.metrics:
            report, cost = analysis(family, metric, args.n_calibration, args.eval_steps, folder)
            deltas = [report.entries[(i, "block")]["delta"] for i in range(n_blocks)]
            rows.append([family, metric, f"{spearman(deltas, psnr_loss):+.2f}", f"{spearman(deltas, shape_drop):+.2f}",
                         "  ".join(f"{d:.3g}" for d in deltas)])
            if cost is None:
                cost_rows.append([family, metric, len(report.entries), "not recorded", "not recorded"])
            else:
                cost_rows.append([family, metric, len(report.entries),
                                  f"{cost['seconds']:.1f} s" + (" (resumed: this run's entries)" if cost["resumed"]
                                                                 else ""),
                                  f"{cost['seconds'] / max(cost['computed_entries'], 1):.2f} s"])
        notes.append(f"- {family}: damage over {args.n_heldout} held-out prompts, full model ShapeEval "
                     f"{damage['full_shapeeval']:.3f}; PSNR per skipped block "
                     + ", ".join(f"{b['block']}: {b['psnr']:.1f}" for b in damage["blocks"])
                     + "; ShapeEval drop " + ", ".join(f"{b['block']}: {s:+.3f}" for b, s in
                                                      zip(damage["blocks"], shape_drop)))
    if args.sweep_only:
        return
    body = (
        markdown_table(["toy", "metric", "rho vs PSNR loss", "rho vs ShapeEval drop", "dP(block) by block index"],
                       rows)
        + f"\n\nSpearman rank correlation of each metric's dP(block) (analysis of {args.n_calibration} calibration "
        f"prompts, the toy's own generation settings; velocity compares {args.eval_steps} steps) with the measured "
        "damage of skipping that block. Analysis cost (every entry: blocks and components, one process, "
        "this machine):\n\n"
        + markdown_table(["toy", "metric", "entries", "wall time", "per entry"], cost_rows)
        + "\n\nBlock position against the damage of skipping the block (Spearman's rho of the block's index in "
        "execution order with its PSNR loss and its ShapeEval drop: negative where later blocks matter less):\n\n"
        + markdown_table(["toy", "blocks", "full ShapeEval", "rho(position, PSNR loss)",
                          "rho(position, ShapeEval drop)"], position_rows)
        + "\n\n" + "\n".join(notes) + "\n"
    )
    update_section(name, title, body)
    print(body)


if __name__ == "__main__":
    main()
