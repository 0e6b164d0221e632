"""Issue 5's evidence: recovery of the SD3 toy at a 30 % HPP plan, with the same distillation budget per row.

    python benchmarks/toy_distill_recovery.py [--minutes 20] [--samples 600] [--n-eval 200]

Rows: the teacher; HPP alone (no training); HPP + PWP (plain distillation, one learning
rate); HPP + PWP + SGDistill. Every trained row gets the same data (the teacher's own drawings
of training prompts, cached once), learning rate, batch size and wall-clock budget on this
machine's cores. ShapeEval on held-out prompts, as in toy_quality.py.

Each finished row is kept in ``OUT/rows.json`` with the settings it ran with; a second run with
the same settings reuses those rows (so a run cut off part way goes on where it stopped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import markdown_table, update_section  # noqa: E402

from diffusers_hprune import prune_pipeline, toy  # noqa: E402
from diffusers_hprune.analysis import analyze  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer  # noqa: E402
from diffusers_hprune.distillation.trainer import DistillConfig, distill  # noqa: E402
from diffusers_hprune.planning import make_plan  # noqa: E402
from diffusers_hprune.utils.fileio import atomic_write_json  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per trained row")
    parser.add_argument("--samples", type=int, default=600, help="teacher drawings to train on")
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="build/distill-recovery")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    family = "sd3"
    prompts = toy.prompts(split="heldout", n=args.n_eval, seed=0)

    def score(pipe) -> dict:
        return toy.shapeeval(toy.generate(pipe, prompts, seed=0), prompts)

    teacher = toy.load_pipeline(family)
    results = {"Original (teacher)": (score(teacher), None)}
    start = time.perf_counter()
    report = analyze(teacher, out / "analysis.json", n_prompts=8, eval_steps=4, progress=False, overwrite=True)
    analysis_seconds = time.perf_counter() - start
    outcome = make_plan(report.contributions(), inspect_transformer(teacher.transformer), ratio=args.ratio)
    outcome.plan.save(out / "plan.json")
    print(outcome.summary(), flush=True)
    results["HPP alone (no training)"] = (score(prune_pipeline(teacher, outcome.plan)), None)
    train_prompts = toy.prompts(split="train")
    lines = [train_prompts[k % len(train_prompts)] for k in range(args.samples)]
    (out / "prompts.txt").write_text("\n".join(lines) + "\n")
    variants = {"HPP + PWP": {"sgdistill": False}, "HPP + PWP + SGDistill": {}}
    settings = {"minutes": args.minutes, "samples": args.samples, "lr": args.lr, "batch": args.batch,
                "plan": outcome.plan.describe(), "threads": torch.get_num_threads()}
    done_file = out / "rows.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for name, options in variants.items():
        if name in done and done[name]["settings"] == settings:
            results[name] = (done[name]["score"], done[name]["summary"])
            print(name, "reused from", done_file, flush=True)
            continue
        folder = out / name.replace(" ", "").replace("+", "-").lower()
        summary = distill(DistillConfig(
            teacher=family, plan=str(out / "plan.json"), analysis=str(out / "analysis.json"), output_dir=str(folder),
            prompts=str(out / "prompts.txt"), cache_dir=str(out / "cache"), max_train_steps=10**9,
            max_train_minutes=args.minutes, learning_rate=args.lr, train_batch_size=args.batch,
            checkpointing_steps=0, progress=False, overwrite=True, **options,
        ))
        student = toy.load_pipeline(folder)
        results[name] = (score(student), summary)
        done[name] = {"settings": settings, "score": results[name][0], "summary": summary}
        atomic_write_json(done_file, done)
        print(name, results[name][0]["overall"], summary["steps"], flush=True)
    base = results["Original (teacher)"][0]["overall"]
    rows = []
    for name, (r, summary) in results.items():
        rows.append([name, "-" if summary is None else summary["steps"],
                     "-" if summary is None else f"{summary['seconds'] / 60:.1f}",
                     "-" if summary is None else summary["trainable_params"],
                     r["overall"], *(r[c] for c in toy.CATEGORIES), f"{r['overall'] / base:.1%}"])
    body = markdown_table(["row", "steps", "minutes", "trainable params", "overall", *toy.CATEGORIES,
                           "of teacher"], rows)
    body += (
        f"\n\nPlan ({outcome.ratio:.1%} of the transformer's parameters removed, from a fidelity analysis of "
        f"{analysis_seconds:.0f} s): {outcome.plan.describe()}. Training data: {args.samples} drawings by the "
        f"teacher of training prompts (cached once, not counted in the budget); learning rate {args.lr}, batch "
        f"{args.batch}, {args.minutes:g} minutes per trained row, {torch.get_num_threads()} threads. ShapeEval on "
        f"{args.n_eval} held-out prompts.\n"
    )
    (out / "results.json").write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=2))
    update_section("toy-distill-recovery", "Distillation recovery on the SD3 toy at 30 % (issue 5)", body)
    print(body)


if __name__ == "__main__":
    main()
